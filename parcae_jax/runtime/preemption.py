"""Stopping on a signal: SIGTERM (a preemption notice) or Ctrl-C saves a checkpoint after the
current step, on every process at the same step, and the run exits with 128 + the signal."""

from __future__ import annotations

import os
import signal
import sys

from absl import logging


class Preemption:
    """A preemption notice (SIGTERM) or Ctrl-C (SIGINT) asks the loop to save and stop after a
    step; a second Ctrl-C stops at once, without a checkpoint.

    One process: our own handlers set a flag. Several processes: every one must stop at the
    same step, and asking the others on every step would be a blocking collective. JAX's
    preemption service (started by jax.distributed.initialize) catches SIGTERM itself, agrees
    on a stop step in the background, and `reached_preemption_sync_point(step)` is a local
    check; so there we leave SIGTERM to JAX (a handler of ours would replace its own) and
    turn a Ctrl-C into a SIGTERM to ourselves."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self.distributed = _preemption_service() is not None
        handled = (signal.SIGINT,) if self.distributed else (signal.SIGINT, signal.SIGTERM)
        self._previous = {s: signal.signal(s, self._handle) for s in handled}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            print("error: interrupted again: stopping now, without a checkpoint (the last saved one is intact)",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        logging.warning("%s: saving a checkpoint after this step, then stopping%s", signal.Signals(signum).name,
                        " (Ctrl-C again stops at once)" if signum == signal.SIGINT else "")
        self.signum = signum
        if self.distributed:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service tells every process
        else:
            self.requested = True

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step` (to be asked after every step, on every process)."""
        if self.distributed:
            from jax.experimental import multihost_utils

            self.requested = multihost_utils.reached_preemption_sync_point(step)
            if self.requested and self.signum is None:
                self.signum = signal.SIGTERM  # the notice reached another process first
        return self.requested

    def restore_handler(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)


class Interrupted(Exception):
    """The run stopped early on a signal (after saving); main exits with 128 + signum."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step = signum, step


def _preemption_service():
    """JAX's preemption sync manager, if jax.distributed is up with it (else None)."""
    from jax._src import distributed

    return distributed.global_state.preemption_sync_manager if distributed.global_state.client else None
