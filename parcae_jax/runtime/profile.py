"""A profiler trace of a configurable range of steps (config.profile), written by process 0
into WORKDIR/profile (through the metrics staging folder for a gs:// workdir), readable by
TensorBoard's profile plugin and xprof."""

from __future__ import annotations

import jax
from absl import logging


class Profiler:
    """Starts a trace before step start_step + 1 and stops it after start_step + steps."""

    def __init__(self, profile, directory: str | None):
        self.first, self.last = profile.start_step + 1, profile.start_step + profile.steps
        self.directory = directory if profile.steps > 0 else None
        self.active = False

    def before(self, step: int) -> None:
        """Called before running step + 1."""
        if self.directory and not self.active and step + 1 == self.first:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int | None, state) -> None:
        """Called after `step` ran (None: the loop ended): stops the trace once it covers the range."""
        if self.active and (step is None or step >= self.last):
            jax.block_until_ready(state)  # the trace holds the steps' device work, not only their dispatch
            jax.profiler.stop_trace()
            self.active = False
            logging.warning("profiler trace of steps %d-%d written to %s", self.first, step or self.last,
                            self.directory)
