"""Whether a workdir holds a run of the settings a science command asks for.

The science commands read finished runs back instead of training them again. That is only
right when the run was trained with the same settings: a changed sweep file or base config
must not silently reuse old results. A run's settings are those saved with its newest
readable checkpoint; the settings that cannot change a result (config_keys.EXECUTION) are ignored.
"""

from __future__ import annotations

from parcae_jax.errors import UserError
from parcae_jax.runtime import config_keys, resume
from parcae_jax.runtime.run_dir import RunDir


class OtherSettings(UserError, ValueError):
    """A workdir holds a run of other settings (one line: the differences and the fix)."""


def differences(saved: dict, config: dict) -> str | None:
    """'key old -> new, ...' over the settings that change a result, or None when they agree."""
    changed = resume.changes(saved, config)
    differ = [k for k in changed if config_keys.kind(k) != config_keys.EXECUTION]
    more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
    return ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in differ[:4]) + more if differ else None


def checkpoint_steps(workdir: str) -> list[int]:
    """The workdir's checkpoint steps, ascending (none: [])."""
    ckpts = RunDir(workdir).checkpoints
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def saved_config(workdir: str) -> dict | None:
    """The config saved with the workdir's newest readable checkpoint, or None without one (a
    damaged checkpoint is skipped here, as training sets it aside and resumes from the one before)."""
    steps = checkpoint_steps(workdir)
    if not steps:
        return None
    from absl import logging

    from parcae_jax.runtime.checkpoint import Checkpointer

    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)  # orbax logs every open and read at INFO: a check, not an event
    ckpt = Checkpointer(RunDir(workdir).checkpoints, keep=len(steps), async_save=False)
    try:
        for step in reversed(steps):
            try:
                return ckpt.saved_config(step)
            except Exception:  # noqa: BLE001 - orbax raises many kinds for damaged files
                continue
        return None
    finally:
        ckpt.close()
        logging.set_verbosity(verbosity)


def mismatch(workdir: str, config) -> str | None:
    """The differences between the workdir's run and the ConfigDict `config` (None: same, or no run)."""
    saved = saved_config(workdir)
    return differences(saved, config.to_dict()) if saved is not None else None


def refuse_other(workdir: str, config, fix: str = "use another --out_dir") -> None:
    """Raises OtherSettings when the workdir holds a run of settings other than `config`'s."""
    differ = mismatch(workdir, config)
    if differ:
        raise OtherSettings(f"{workdir} holds a run of other settings ({differ}); {fix}, or delete that folder "
                            "to train it again")
