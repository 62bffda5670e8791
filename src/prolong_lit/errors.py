"""The errors a person fixes: a config setting, an input file, a checkpoint, a path.

Raise `ConfigError`, `DataError` or `CheckpointError` (all `UserError`) with a message that names the setting or
the file to fix. `python -m prolong_lit ...` prints such an error as one line, `error: <message>`, and exits with
status 2, no traceback (`PROLONG_LIT_DEBUG=1` shows it); any other exception is a bug and keeps its traceback.

Each is also a `ValueError`, so code (and tests) that caught the ValueError these refusals used to be still does;
`MissingPathError` / `ExistingPathError` (a path a setting names is missing / in the way) are also
FileNotFoundError / FileExistsError for the same reason.
"""

from __future__ import annotations

import os

# `python -m prolong_lit` exits with this status on a UserError (as argparse does on a bad flag).
USER_ERROR_EXIT_STATUS = 2
DEBUG_ENV = "PROLONG_LIT_DEBUG"


class UserError(ValueError):
    """Something the user gave is wrong; the message says what and where."""


class ConfigError(UserError):
    """A setting (in a YAML file or on the command line) is invalid or inconsistent with another."""


class DataError(UserError):
    """An input or prepared data file is missing, malformed or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, not ours, or incompatible with the config."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or directory a setting names does not exist (or is not the kind of path the setting wants)."""


class ExistingPathError(UserError, FileExistsError):
    """An output path a setting names is already there and may not be replaced."""


def show_tracebacks() -> bool:
    """Whether user errors should keep their traceback (`PROLONG_LIT_DEBUG=1`)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def user_error_of(error: BaseException) -> UserError | None:
    """The UserError behind `error`: itself, or one it was raised from or during (Lightning and the DataLoader
    re-raise a callback's or a worker's exception wrapped in their own)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
