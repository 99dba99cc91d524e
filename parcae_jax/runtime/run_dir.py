"""The layout of a training run's directory, local or gs://: the one place that names its files.

    WORKDIR/
      checkpoints/<step>/     orbax steps (runtime/checkpoint.py)
      metrics.jsonl           one JSON row per logged step (runtime/metrics.py)
      tensorboard/            TensorBoard events
      logs/process_<i>.log    each process's start-up line, warnings and errors
      profile/                profiler traces (config.profile)
      lock                    one trainer per workdir (runtime/workdir_lock.py)
      science/                what `recurrence_curve` writes unless told otherwise
      sweep_point.json        a sweep point's settings and whether it diverged (science/sweep.py)
      stability_run.json      a stability run's settings and loss series (science/stability.py)

A gs:// run writes metrics, events, logs and traces to a local staging folder with the same
layout and uploads them (storage.Mirror), so the names below are relative to either root.
"""

from __future__ import annotations

import dataclasses

from etils import epath

from parcae_jax import storage

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
LOGS = "logs"
PROFILE = "profile"
LOCK = "lock"
SCIENCE = "science"
SWEEP_POINT = "sweep_point.json"
STABILITY_RUN = "stability_run.json"


def _entry(name: str) -> property:
    """WORKDIR/name as an epath.Path."""
    return property(lambda self: self.root / name, doc=f"WORKDIR/{name}")


@dataclasses.dataclass(frozen=True)
class RunDir:
    """A run's directory (`workdir`: a local path or gs://) and the paths in it."""

    workdir: str

    @property
    def root(self) -> epath.Path:
        return storage.resolve(self.workdir)

    checkpoints = _entry(CHECKPOINTS)
    metrics = _entry(METRICS)
    lock = _entry(LOCK)
    sweep_point = _entry(SWEEP_POINT)
    stability_run = _entry(STABILITY_RUN)

    @property
    def science(self) -> str:
        return f"{self.workdir.rstrip('/')}/{SCIENCE}"
