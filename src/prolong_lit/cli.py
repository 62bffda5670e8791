"""Command line: `python -m prolong_lit <subcommand>`, the dispatch to a subcommand and its error handling.

`fit` / `validate` go through `ProLongCLI` (trainer_cli.py, a LightningCLI); the other subcommands
(prolong_lit.commands) parse with jsonargparse, each with its own `--config`. Each subcommand's module is
imported only when it runs, so `prepare`, `tokenizer` or `--help` do not pay Lightning's ~3.5 s import.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# Nothing downloads at run time: fail fast instead of hanging ~50 s on a hub call
# (docs/environment.md, Offline by default).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from prolong_lit.errors import USER_ERROR_EXIT_STATUS, show_tracebacks, user_error_of  # noqa: E402
from prolong_lit.subcommands import TOOL_SUBCOMMANDS, TRAINER_SUBCOMMANDS  # noqa: E402


def _usage() -> str:
    lines = ["usage: python -m prolong_lit <subcommand> [options]", "", "subcommands:"]
    for name, text in TRAINER_SUBCOMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    for name, (_, text) in TOOL_SUBCOMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    lines += ["", "`python -m prolong_lit <subcommand> --help` shows a subcommand's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run a subcommand. A user's mistake (prolong_lit.errors.UserError, also when Lightning or a DataLoader
    worker re-raised it wrapped) ends as one line on stderr and exit status 2; `PROLONG_LIT_DEBUG=1` keeps the
    traceback. Any other exception is a bug and propagates with its traceback."""
    try:
        _dispatch(argv)
    except Exception as error:  # noqa: BLE001 - re-raised below unless it is the user's mistake
        user_error = user_error_of(error)
        if user_error is None or show_tracebacks():
            raise
        print(f"error: {user_error}", file=sys.stderr)  # noqa: T201 - the command's one-line refusal
        sys.exit(USER_ERROR_EXIT_STATUS)


def _dispatch(argv: list[str] | None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())  # noqa: T201 - the help text is the command's output
        return
    name = argv[0]
    if name in TOOL_SUBCOMMANDS:
        module_name, func_name = TOOL_SUBCOMMANDS[name][0].split(":")
        getattr(importlib.import_module(module_name), func_name)(argv[1:])
    elif name in TRAINER_SUBCOMMANDS:
        from prolong_lit.trainer_cli import ProLongCLI  # Lightning (~3.5 s to import) only where it runs

        # LightningCLI reads sys.argv itself when run from the command line (and warns if given both).
        ProLongCLI(args=None if from_command_line else argv)
    else:
        print(f"error: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)  # noqa: T201
        sys.exit(USER_ERROR_EXIT_STATUS)
