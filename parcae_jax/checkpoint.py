"""Orbax checkpoints of the train state, the data iterator and the config; preemption.

Each checkpoint directory `WORKDIR/checkpoints/<step>` holds `state` (params, optimizer,
step, skipped count), `data` (the grain iterator of every process) and `config` (JSON).
Orbax writes under a temporary name and commits with a rename, so an interrupted save is
never taken as the latest. A state with non-finite parameters is never saved over a good
one. Restoring takes the target shardings from the abstract state, so a checkpoint saved
on one mesh loads onto another.
"""

from __future__ import annotations

import signal
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from parcae_jax import storage


@jax.jit
def _all_finite(tree) -> jax.Array:
    """One compiled reduction (not one eager op per leaf of a sharded tree)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = storage.resolve(directory)  # local or gs://
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator, config: dict, wait: bool = False) -> bool:
        """Saves unless the parameters are not finite (then logs and returns False)."""
        if step in self.manager.all_steps():
            return True
        if not bool(_all_finite(state.params)):
            logging.error("step %d: parameters are not finite; not saving over the last good checkpoint", step)
            return False
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(config)))
        if wait:
            self.manager.wait_until_finished()
        return True

    def restore(self, step: int, abstract_state: Any, data_iterator=None, local_batches_per_step: int = 1) -> Any:
        """The state at `step`, laid out as `abstract_state`'s shardings say; positions the
        data iterator, if given, where it was (or, after a change of process count, by the
        step: the loader's order does not depend on it)."""
        if data_iterator is None:  # evaluation: the state alone
            return self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
        has_data = (self.directory / str(step) / "data" /
                    f"process_{jax.process_index()}-of-{jax.process_count()}.json").exists()
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if has_data:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if not has_data:
            grain.experimental.set_next_index(data_iterator, step * local_batches_per_step)
        return restored["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class Preemption:
    """A preemption notice (SIGTERM) asks the loop to save and stop after a step.

    One process: our own SIGTERM handler sets a flag. Several processes: every one must stop
    at the same step, and asking the others on every step would be a blocking collective.
    JAX's preemption service (started by jax.distributed.initialize) catches SIGTERM itself,
    agrees on a stop step in the background, and `reached_preemption_sync_point(step)` is a
    local check; so there we install no handler of our own (it would replace JAX's)."""

    def __init__(self):
        self.requested = False
        self.distributed = _preemption_service() is not None
        self._previous = None if self.distributed else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        logging.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step` (to be asked after every step, on every process)."""
        if self.distributed:
            from jax.experimental import multihost_utils

            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore_handler(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _preemption_service():
    """JAX's preemption sync manager, if jax.distributed is up with it (else None)."""
    from jax._src import distributed

    return distributed.global_state.preemption_sync_manager if distributed.global_state.client else None
