"""The one base of every error that is the user's to fix (bad input, a fixable environment).

Each command's error boundary (commands/cli.py) prints such an error's first line after
`error:` and exits with its `exit_code` (2, or 3 for a run that stopped on non-finite
steps); anything else is a bug and keeps its traceback. Modules anywhere in the package
derive their errors from it, so this module imports nothing."""

from __future__ import annotations

import sys
from typing import NoReturn


class UserError(Exception):
    """Bad input or a fixable environment; the message's first line names the problem and the fix."""

    exit_code = 2


class UsageError(UserError, ValueError):
    """A command line that cannot run as given (a missing flag, flags that do not go together)."""


def first_line(e: BaseException) -> str:
    """An exception's first line, or its type's name when it has no message."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def moved(command: str) -> NoReturn:
    """For a library module run as `python -m` by an older habit: its command now lives in the
    command layer, and running the library would do nothing and exit 0."""
    print(f"error: this module is a library now; run python -m {command} (--help lists its flags)", file=sys.stderr)
    sys.exit(2)
