"""Orbax checkpoints of the train state, the data iterator and the config.

Each checkpoint directory `WORKDIR/checkpoints/<step>` holds `state` (params, optimizer,
step, skipped count), `data` (the grain iterator of every process: for prepared data a
cross-check, resuming positions the loader by the step alone; for a stream the position
itself) and `config` (JSON).
Orbax writes under a temporary name and commits with a rename, so an interrupted save is
never taken as the latest. A state with non-finite parameters is never saved over a good
one. Restoring takes the target shardings from the abstract state, so a checkpoint saved
on one mesh loads onto another. A checkpoint that cannot be read is set aside, and the one
before it restored.
"""

from __future__ import annotations

import errno
import json
import logging as logging_std
import shutil
import threading
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from parcae_jax import storage
from parcae_jax.errors import UserError


def all_finite(tree) -> jax.Array:
    """Whether every element of every floating-point leaf is finite (a scalar bool)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


_all_finite = jax.jit(all_finite)  # one compiled reduction, not one eager op per leaf


class _OrbaxLogFilter(logging_std.Filter):
    """Orbax warns when a save waited over a second for the previous one ("consider
    checkpointing less frequently"): the cadence is the user's ckpt.every, and on a loaded
    machine the line lands between a run's real messages. And orbax logs a failed background
    save with its traceback from each thread that sees it (hundreds of lines): the failure
    reaches the main thread whole (Checkpointer._finish), so its log lines keep their message."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        if "/orbax/" in record.pathname and record.exc_info:
            record.exc_info = record.exc_text = None
        return "Waiting for previous save to complete took" not in record.getMessage()


logging_std.getLogger("absl").addFilter(_OrbaxLogFilter())

# orbax's names: a save in progress (any store), and a committed step (GCS, no atomic rename)
_TMP_SUFFIX, _COMMIT_MARKER = ".orbax-checkpoint-tmp", "commit_success.txt"


class CheckpointError(UserError, RuntimeError):
    """No checkpoint of the workdir can be restored; the message is one line."""


class Checkpointer:
    """One run's checkpoints. Saves are asynchronous: a thread per save waits for orbax to
    commit it, checks that it did, then deletes what `keep` no longer holds (`_finish`). A
    failure there is raised in the training loop by the next `check()`, within a step."""

    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = storage.resolve(directory)  # local or gs://
        self.keep = keep
        # Old steps are deleted here, not by orbax: its deleter stops the run on a step that a
        # killed run already deleted in part (on GCS a step is many objects, removed one by one).
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save, create=True))
        self._finishing: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._reported = False  # a failure was raised: orbax will raise it again on close

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator, config: dict, wait: bool = False) -> bool:
        """Saves unless the parameters are not finite (then logs and returns False)."""
        if step in self.manager.all_steps():
            return True
        if not bool(_all_finite(state.params)):
            logging.error("step %d: parameters are not finite; not saving over the last good checkpoint", step)
            return False
        self._join()  # orbax would wait for the previous save here anyway
        self._check_space(step, state)
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
                config=ocp.args.JsonSave(config)))
        except OSError as e:  # e.g. the disk filled up during the (synchronous part of the) write
            raise self._cannot_write(step, e.strerror or str(e), e.errno == errno.ENOSPC) from None
        self._finishing = threading.Thread(target=self._finish, args=(step,), name=f"checkpoint {step}", daemon=True)
        self._finishing.start()
        if wait:
            self._join()
        return True

    def check(self) -> None:
        """Raises, as one line, the failure of a save that finished in the background."""
        if self._failure is not None:
            self._join()

    def _join(self) -> None:
        if self._finishing is not None:
            self._finishing.join()
            self._finishing = None
        failure, self._failure = self._failure, None
        if failure is not None:
            self._reported = True
            raise failure

    def _finish(self, step: int) -> None:
        """The save thread's end: orbax's commit, proof that it happened, then the old steps go."""
        try:
            self.manager.wait_until_finished()
            self.manager.reload()  # what the store holds now, not what this manager wrote
            if step not in self.manager.all_steps():  # orbax logged the cause and skipped the commit
                raise OSError(f"checkpoint {step} was not committed (see the log above)")
            if jax.process_index() == 0:
                self.collect(step)
        except OSError as e:  # the store refused: one line in the main thread
            why = (e.strerror or str(e) or type(e).__name__).splitlines()[0][:200]
            self._failure = self._cannot_write(step, why, e.errno == errno.ENOSPC)
        except BaseException as e:  # noqa: BLE001 - a bug: raised in the main thread with its traceback
            self._failure = e

    def collect(self, newest: int) -> None:
        """Deletes the committed steps beyond the newest `keep`, and what killed runs left of
        saves or deletions older than `newest`; idempotent, so what a run killed here left is
        finished by the next save or resume. Only the workdir's owner (its lock) calls it."""
        committed = sorted(self.manager.all_steps())
        kept = set(committed[-self.keep:])
        for path in storage.fresh_listing(self.directory):
            number = path.name.split(_TMP_SUFFIX)[0]
            if number.isdigit() and int(number) < newest and (int(number) not in kept or path.name != number):
                try:
                    storage.remove_tree(path, first=_COMMIT_MARKER)
                except OSError as e:  # costs space, not the run (nor the other processes' next step)
                    logging.warning("could not delete old checkpoint %s (%s); the next save tries again", path,
                                    e.strerror or e)
        self.manager.reload()

    def _check_space(self, step: int, state: Any) -> None:
        """Refuses, before orbax starts, a save that a local disk cannot hold: a full disk found
        mid-write costs that checkpoint and floods the log from orbax's threads."""
        if storage.is_remote(self.directory):
            return
        need = int(1.1 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))) + (4 << 20)
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise self._cannot_write(step, f"{free / 1e6:.1f} MB free, about {need / 1e6:.1f} MB needed", True)

    def _cannot_write(self, step: int, why: str, out_of_space: bool) -> storage.StorageError:
        kept = [s for s in self.manager.all_steps() if s != step]
        intact = f"checkpoint {max(kept)} is intact" if kept else "no checkpoint was saved yet"
        fix = "free space" if out_of_space else "fix that"
        return storage.StorageError(f"{self.directory}: cannot write checkpoint {step} ({why}); {intact}: {fix}, "
                                    "then run the same command to resume")

    def saved_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore(self, step: int, abstract_state: Any, data_iterator=None, data_index: int | None = None) -> Any:
        """The state at `step`, laid out as `abstract_state`'s shardings say, and the data
        iterator, if given, at loader batch `data_index` (default `step`).

        The data position is always this pure function of the step (the loader's order depends
        on neither the process count nor the workers): one mechanism, whatever changed between
        runs. The saved grain state is only a cross-check (see _check_data_position)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        if data_iterator is not None and not isinstance(data_iterator, grain.DatasetIterator):
            data_iterator.set_state(self._saved_stream_position(step))  # a stream (data/stream.py)
        elif data_iterator is not None:
            index = step if data_index is None else data_index
            if data_index is None:
                self._check_data_position(step, index)
            grain.experimental.set_next_index(data_iterator, index)
        return restored["state"]

    def _saved_stream_position(self, step: int) -> bytes:
        """This process's saved stream state. A stream has no index to compute from the step: each
        process's position is its own, so the process count cannot change on resume."""
        folder = self.directory / str(step) / "data"
        path = folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            saved = sorted(p.name for p in folder.glob("process_*.json")) if folder.exists() else []
            raise CheckpointMismatch(
                f"checkpoint {step} holds the stream positions of {saved[0].split('-of-')[-1][:-5] if saved else 'no'} "
                f"processes, not {jax.process_count()}: a streamed run (data.source=stream) resumes with the "
                "process count it was saved with") from None

    def _check_data_position(self, step: int, index: int) -> None:
        """Warns if this process's saved iterator (one without worker processes) was elsewhere:
        a loader consumed more or less than one batch a step, which would be a bug."""
        path = self.directory / str(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        try:
            saved = json.loads(path.read_text()).get("next_index")
        except (OSError, ValueError, AttributeError):  # another process count, workers, an old format
            return
        if isinstance(saved, int) and saved != index:
            logging.warning("checkpoint %d: the saved data iterator was at batch %d, the step says %d; resuming at %d",
                            step, saved, index, index)

    def restore_newest(self, abstract_state: Any, data_iterator=None,
                       check: Callable[[dict, int], int | None] | None = None,
                       set_aside: bool = True, read: Callable[[int, dict], Any] | None = None,
                       only: int | None = None) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores, or None if there is none.

        `check(saved_config, step)` may refuse (by raising) or return a data index for
        `restore`. A checkpoint that cannot be read (truncated or garbage files, a missing item,
        an empty folder) is reported in one line and, with set_aside, moved to
        `checkpoints_unreadable/` beside the checkpoints (never deleted); then the one before it
        is tried. Readers of a run (generate, export, recurrence_curve) pass `read(step, saved_config)`
        to restore what they need, set_aside=False, and `only` for a step the user named."""
        steps = sorted(self.manager.all_steps(), reverse=True) if only is None else [only]
        aside = self._aside_dir()
        if not steps and aside.exists() and any(aside.iterdir()):  # never silently start again from step 0
            raise CheckpointError(f"{self.directory} has no checkpoint left, but {aside} holds the ones set aside "
                                  "as unreadable; inspect them, then delete that folder to start over from step 0")
        for step in steps:
            try:
                saved = self.saved_config(step)
            except Exception as e:  # noqa: BLE001 - orbax raises many kinds for damaged files
                self._unreadable(step, e, set_aside)
                continue
            data_index = check(saved, step) if check else None  # a refusal is not damage: it propagates
            mismatch = self._mismatch(step, abstract_state) if abstract_state is not None else None
            if mismatch:  # the request does not fit an intact checkpoint: the user's to fix, nothing moved
                raise CheckpointMismatch(
                    f"checkpoint {step} in {self.directory} does not fit this config ({mismatch}); arrays "
                    "cannot change shape on resume, even with ckpt.allow_changes: resume with the run's own "
                    "config, or use a new workdir")
            try:
                return step, (read(step, saved) if read else self.restore(step, abstract_state, data_iterator,
                                                                          data_index))
            except Exception as e:  # noqa: BLE001
                if isinstance(e, CheckpointMismatch):
                    raise
                self._unreadable(step, e, set_aside)
        if steps and set_aside:
            raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} can be restored (moved to "
                                  f"{self._aside_dir()}); delete them or use a new workdir to start over")
        if steps:
            raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} can be read; see the "
                                  "errors above, or train again")
        return None

    def _mismatch(self, step: int, abstract_state: Any) -> str | None:
        """The first array whose saved shape or dtype differs from the requested one (or that
        one side lacks), from the checkpoint's own metadata; None if they agree or the metadata
        cannot be read (then the checkpoint is damaged)."""
        try:
            saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
            saved = _by_path(saved.tree if hasattr(saved, "tree") else saved)
        except Exception:  # noqa: BLE001 - unreadable metadata is damage, not a mismatch
            return None
        wanted = _by_path(abstract_state)
        for path in sorted(set(saved) | set(wanted), key=lambda p: (not p.startswith("params"), p)):  # params first
            if path not in saved:
                return f"{path} is not in the checkpoint"
            if path not in wanted:
                return f"the checkpoint holds {path}, which this config lacks"
            if saved[path] != wanted[path]:
                return f"{path} is {_show(saved[path])} in the checkpoint, {_show(wanted[path])} here"
        return None

    def _aside_dir(self):
        return self.directory.parent / f"{self.directory.name}_unreadable"

    def _unreadable(self, step: int, error: Exception, set_aside: bool) -> None:
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        where = ""
        if set_aside:
            target = self._aside_dir() / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            if jax.process_index() == 0:
                target.parent.mkdir(parents=True, exist_ok=True)
                (self.directory / str(step)).rename(target)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
            self.manager.reload()
            where = f"; moved to {target}"
        logging.error("checkpoint %d cannot be restored (%s: %s)%s; trying the one before", step,
                      type(error).__name__, reason, where)

    def close(self) -> None:
        """Waits for the last save (raising its failure) and closes orbax's threads."""
        try:
            self._join()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001
                if not self._reported:  # else orbax raises again the failure _join reported
                    raise


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint whose arrays do not fit the requested state (one line)."""


def _by_path(tree: Any) -> dict[str, tuple]:
    """{'params/embed/embedding': (shape, dtype)} whatever the tree's node types (a TrainState
    here, nested dicts in orbax's metadata)."""
    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves}


def _show(shape_dtype: tuple) -> str:
    return f"{list(shape_dtype[0])} {shape_dtype[1]}"


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
