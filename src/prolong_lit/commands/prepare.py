"""`python -m prolong_lit prepare`: raw documents -> tokenized, filtered, packed litdata shards, one directory per
domain.

    python -m prolong_lit prepare --config configs/data/demo.yaml [--overwrite] [--output_dir X]

The options are `prolong_lit.data.prepare.PrepareConfig`'s fields (usually from a YAML data spec, flags override
it) and `--overwrite`. Their parser is the library's (`prolong_lit.data.prepare.build_parser`): a pipeline phase's
`prepare:` list takes the same arguments and must not import a command. The work, every check first, is
`prolong_lit.data.prepare.prepare`.
"""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser


def build_parser() -> ArgumentParser:
    """The options of `prepare`: PrepareConfig's fields, `--config`, `--print_config` and `--overwrite`."""
    from prolong_lit.data.prepare import build_parser as prepare_arguments

    return prepare_arguments()


def main(argv: list[str]) -> None:
    """`python -m prolong_lit prepare ...`: parse, then prepare (every setting is checked before any work)."""
    from prolong_lit.data.prepare import parse_config, prepare

    config, overwrite = parse_config(argv)
    # A SIGTERM (`kill`, Slurm's time limit) ends the command as Ctrl-C does: through prepare's clean-up, which
    # removes its scratch folder and a partial output (a SIGKILL leaves both to the next run, which finds them).
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        prepare(config, overwrite=overwrite)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame) -> None:
    sys.exit(128 + signum)
