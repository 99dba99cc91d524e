"""Which exceptions are the user's to fix: every command's error boundary turns these into
one line and exit code 2, and lets anything else (a bug) show its traceback."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


def user_errors() -> tuple[type[Exception], ...]:
    """The error types that mean bad input or a fixable environment (each message is one line).
    Imported only when something failed: the watcher parent of a multi-process run stays small."""
    from parcae_jax.checkpoint import CheckpointError
    from parcae_jax.data.readers import DataError
    from parcae_jax.distributed import DistributedError
    from parcae_jax.model.config import ConfigError
    from parcae_jax.reference_config import ConversionError
    from parcae_jax.resume import ResumeRefused
    from parcae_jax.storage import StorageError

    return ConfigError, DataError, StorageError, DistributedError, ResumeRefused, CheckpointError, ConversionError


@contextlib.contextmanager
def one_line_errors(*extra: type[Exception]) -> Iterator[None]:
    """A command's error boundary: a user error (user_errors() or one of `extra`) becomes one
    line on stderr and exit code 2; a run stopped by a signal after saving its checkpoint
    exits 128 + the signal, so that a scheduler requeues it. Anything else is a bug and keeps
    its traceback."""
    from parcae_jax.preemption import Interrupted

    try:
        yield
    except Interrupted as e:
        sys.exit(128 + e.signum)
    except Exception as e:
        if not isinstance(e, (*user_errors(), *extra)):
            raise
        print(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        sys.exit(2)
