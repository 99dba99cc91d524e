"""The flag every science command shares (absl defines a flag once per process)."""

from absl import flags

from parcae_jax.errors import UsageError

OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the command writes its files (each command says its default).")


def out_dir(what: str) -> str:
    """--out_dir, for a command that needs it; `what` says what goes there."""
    if not OUT_DIR.value:
        raise UsageError(f"pass --out_dir=DIR ({what} go there)")
    return OUT_DIR.value
