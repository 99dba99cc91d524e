"""Which exceptions are the user's to fix: every command's error boundary turns these into
one line and exit code 2, and lets anything else (a bug) show its traceback."""

from __future__ import annotations


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
