"""What a resumed run may change: the config saved in a checkpoint against the one resuming it.

A workdir is one run. Resuming it with another seed would mix two depth and data streams;
another batch size would re-read windows already trained on; another model shape or tokenizer
cannot load at all, or means something else. Such changes (config_keys.IDENTITY) are refused in
one line naming each field (old -> new) and the flag that accepts it on purpose,
`ckpt.allow_changes`. Learning rates, step counts, cadences, the mesh, remat and the like
(SCHEDULE, EXECUTION) change nothing the run is: they are allowed and logged. An accepted
batch-size change resumes at the same place in the data: the sequences already read are
counted, and the loader starts at the first whole new batch after them.
"""

from __future__ import annotations

from absl import logging

from parcae_jax.errors import UserError
from parcae_jax.runtime import config_keys


class ResumeRefused(UserError, ValueError):
    """The resuming config changes what the run means; the message is one line."""


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def _meaningful(key: str) -> bool:
    return config_keys.kind(key) == config_keys.IDENTITY


def changes(saved: dict, now: dict) -> dict[str, tuple]:
    """{dotted key: (saved value, new value)} for every setting that differs (tuples as lists)."""
    old, new = _flat(saved), _flat(now)
    old.pop("ckpt.allow_changes", None), new.pop("ckpt.allow_changes", None)
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def check(saved: dict, now: dict, step: int, allow: str | None, fix: str | None = None) -> int | None:
    """Refuses meaningful changes not in `allow` (comma-separated keys, or "*"); logs the rest.

    Returns the loader's batch index to resume at when the global batch changed (None: resume
    the saved loader state as it is)."""
    old, new = _flat(saved), _flat(now)
    changed = changes(saved, now)
    accepted = {k.strip() for k in (allow or "").split(",") if k.strip()}
    refused = [k for k in changed if _meaningful(k) and k not in accepted and "*" not in accepted]
    if refused:
        diff = ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        fix = fix or (f"use a new workdir, or accept the change with "
                      f"--config.ckpt.allow_changes={','.join(refused)}")
        raise ResumeRefused(f"the workdir's checkpoint {step} was made with other settings: {diff}; {fix}")
    for k, (a, b) in changed.items():
        logging.warning("resuming with %s changed: %r -> %r%s", k, a, b, " (accepted)" if _meaningful(k) else "")
    if "train.batch_size" in changed:
        seen = step * old["train.batch_size"]
        logging.warning("batch size changed: %d sequences were read; resuming at the next whole batch of %d", seen,
                        new["train.batch_size"])
        return -(-seen // new["train.batch_size"])
    return None
