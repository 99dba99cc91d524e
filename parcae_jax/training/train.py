"""The training loop: set-up (mesh, data, sharded state or resume), steps, logs, evals,
checkpoints, and a clean stop on SIGTERM. The step itself is in step.py."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from parcae_jax import storage
from parcae_jax.data import dataset
from parcae_jax.data.pipeline import to_global
from parcae_jax.errors import UserError
from parcae_jax.model import build, init_params
from parcae_jax.runtime import compile_cache, resume
from parcae_jax.runtime.checkpoint import Checkpointer, CheckpointError, abstract_with_shardings
from parcae_jax.runtime.metrics import MetricsWriter, ProcessLog, check_outputs, eval_key, peak_flops, slow_hosts
from parcae_jax.runtime.preemption import Interrupted, Preemption
from parcae_jax.runtime.profile import Profiler
from parcae_jax.runtime.run_dir import PROFILE, RunDir
from parcae_jax.runtime.workdir_lock import WorkdirBusy, WorkdirLock
from parcae_jax.training import sharding
from parcae_jax.training.describe import flops_per_token
from parcae_jax.training.fused_adamw import make_update, uses_kernel
from parcae_jax.training.optim import make_optimizer, schedule_values
from parcae_jax.training.step import TrainState, init_state, make_eval_step, make_train_step
from parcae_jax.training.validate import Run


class Trainer:
    """Everything a run needs, built once: mesh, model, optimizer, shardings, jitted steps."""

    def __init__(self, config, run: Run, devices=None):
        self.config, self.run = config, run
        self.mesh = sharding.make_mesh(run.mesh_shape, devices)  # validated once, by validate()
        self.model = build(run.model)
        self.tx, self.lrs = make_optimizer(config.optim)
        with self.context():
            key = jax.random.key(config.seed)
            boxed = jax.eval_shape(lambda: init_params(self.model, key))
            self.abstract = jax.eval_shape(lambda: init_state(self.model, self.tx, key))
            params_sh = sharding.param_shardings(boxed, self.mesh)
            rep = sharding.replicated(self.mesh)
            self.state_sharding = TrainState(rep, params_sh,
                                             sharding.like_params(self.abstract.opt_state, self.abstract.params,
                                                                  params_sh, self.mesh), rep)
            self.batch_sharding = sharding.batch_sharding(self.mesh)
            # train_step's third argument, put on the devices once rather than sent every step
            self.schedule = to_global(schedule_values(config.optim, config.train.steps), rep)
            t = config.train
            masking = config.data.document_masking
            fused = make_update(config.optim, self.lrs["lr"]) if uses_kernel(config.optim, self.mesh.size) else None
            step = make_train_step(self.model, self.tx, self.lrs, seed=config.seed, microbatches=t.microbatches,
                                   clip_norm=t.clip_norm, document_masking=masking, fused_update=fused)
            self.train_step = jax.jit(step, in_shardings=(self.state_sharding, self.batch_sharding, rep),
                                      out_shardings=(self.state_sharding, rep), donate_argnums=0)
            self.eval_step = jax.jit(make_eval_step(self.model, seed=config.seed, document_masking=masking),
                                     in_shardings=(params_sh, self.batch_sharding, rep), out_shardings=rep)
            self.init = jax.jit(lambda k: init_state(self.model, self.tx, k), out_shardings=self.state_sharding)

    def context(self):
        """Mesh and logical-axis rules, active whenever the model is traced."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(sharding.RULES))
        return stack

    def fresh_state(self) -> TrainState:
        with self.context():
            return self.init(jax.random.key(self.config.seed))

    def local_eval_batches(self, data) -> list[dict]:
        """This process's rows of the first `train.eval_batches` validation batches of `data`
        (dataset.open_data; the same every eval)."""
        return data.eval_batches(self.run.model.seq_len, self.config.train.batch_size, self.config.train.eval_batches,
                                 jax.process_index(), jax.process_count())

    def evaluate(self, params, batches: list[dict]) -> dict[str, float]:
        """Mean validation loss at every eval recurrence, on the same batches each time."""
        sums = {}
        recurrences = self.run.eval_recurrences if self.run.model.arch == "parcae" else (0,)
        with self.context():
            for R in recurrences:  # dispatch every batch first; one fetch at the end
                key = eval_key(self.run.model.arch, R)
                sums[key] = [self.eval_step(params, batch, jnp.int32(max(R, 1))) for batch in batches]
        fetched = jax.device_get(sums)
        return {key: float(sum(float(loss) for loss, _ in parts)) / max(sum(int(n) for _, n in parts), 1)
                for key, parts in fetched.items()}


class NonFiniteRun(UserError, RuntimeError):
    """Too many consecutive steps were skipped: the run cannot recover by itself (exit code 3,
    apart from bad input, so that a scheduler does not requeue it)."""

    exit_code = 3


def _mean(fetched: list[dict]) -> dict[str, float]:
    keys = fetched[-1].keys()
    out = {k: float(np.mean([m[k] for m in fetched])) for k in keys if k not in ("skipped", "tokens")}
    out["tokens"] = float(sum(m["tokens"] for m in fetched))
    out["skipped"] = float(sum(bool(m["skipped"]) for m in fetched))
    return out


def _data_wait(local_s: float, step_time_s: float, nproc: int) -> float:
    """The largest per-step input wait over processes; warns about a host the others wait for."""
    if nproc == 1:
        return local_s
    from jax.experimental import multihost_utils

    waits = [float(w) for w in multihost_utils.process_allgather(np.float32(local_s))]
    for i, s, median in slow_hosts(waits, step_time_s):
        logging.warning("slow host: process %d waits %.3f s/step for input data against a median of %.3f s; "
                        "every collective waits for it (check its disk, CPU load and data.read_threads)", i, s, median)
    return max(waits)


def train(config, workdir: str, run: Run, trainer: Trainer | None = None) -> dict[str, float]:
    """Trains to config.train.steps, resuming from the latest checkpoint in workdir.

    `trainer` (built from the same config and run) lets callers reuse its compiled steps.
    Process 0 holds the workdir's lock throughout (workdir_lock.py): a second trainer stops.
    The compilation cache the config asks for is turned on first, so that every caller's runs
    (a sweep's points, a stability variant's rates) load the steps compiled before."""
    compile_cache.enable(config.compilation_cache_dir, config.data.cache_dir)
    storage.make_dir(workdir)
    if jax.process_index() != 0:
        return _train(config, workdir, run, trainer, lambda: True)
    with WorkdirLock(workdir, config.ckpt.lock_lease_s) as lock:
        return _train(config, workdir, run, trainer, lock.held)


def _train(config, workdir: str, run: Run, trainer: Trainer | None, owns_workdir) -> dict[str, float]:
    t, pid, nproc = config.train, jax.process_index(), jax.process_count()
    root = storage.resolve(workdir)
    trainer = trainer or Trainer(config, run)
    tok = run.tokenizer
    data = dataset.open_data(config.data, tok, progress=pid == 0)
    loader = data.train_loader(run.model.seq_len, t.batch_size, config.seed, pid, nproc)
    data_iter = iter(loader)
    ckpt = Checkpointer(storage.make_dir(RunDir(workdir).checkpoints), config.ckpt.keep, config.ckpt.async_save)
    check_outputs(workdir)
    config_dict = config.to_dict()
    guard = lambda saved, step: resume.check(saved, config_dict, step, config.ckpt.allow_changes)  # noqa: E731
    with trainer.context():
        target = abstract_with_shardings(trainer.abstract, trainer.state_sharding)
        found = ckpt.restore_newest(target, data_iter, guard)
        state = trainer.fresh_state() if found is None else found[1]
    start = int(jax.device_get(state.step))
    if found is not None:
        logging.warning("resumed from checkpoint %d in %s", start, ckpt.directory)
        if pid == 0:
            ckpt.collect(start)  # what a run killed while saving or deleting left behind
    writer = MetricsWriter(workdir, start, t.steps, enabled=pid == 0, wandb_config=config.wandb, run_config=config_dict)
    proc_log = ProcessLog(root, pid, nproc, f"{jax.local_device_count()} local / {jax.device_count()} devices "
                          f"({jax.devices()[0].device_kind}), jax {jax.__version__}, resuming from step {start}")
    profiler = Profiler(config.profile, os.path.join(writer.local_dir, PROFILE) if pid == 0 else None)
    local_eval = trainer.local_eval_batches(data)
    eval_batches = [to_global(b, trainer.batch_sharding) for b in local_eval]
    unigram = data.unigram_loss(local_eval, run.model.padded_vocab_size) if pid == 0 else None
    fpt = flops_per_token(run.model)["flops_per_token"]
    peak = peak_flops(jax.devices()[0].device_kind)
    preempt = Preemption()
    pending: list[dict] = []
    last = {}
    tick, tick_step = time.perf_counter(), start
    data_wait = 0.0  # seconds this process spent waiting for its input since the last log
    skips_in_row = 0
    step = start
    try:
        with trainer.context():
            while step < t.steps:
                profiler.before(step)
                waited = time.perf_counter()
                batch = to_global(next(data_iter), trainer.batch_sharding)
                data_wait += time.perf_counter() - waited
                state, metrics = trainer.train_step(state, batch, trainer.schedule)
                pending.append(metrics)
                step += 1
                profiler.after(step, state)
                ckpt.check()  # a save that failed in the background stops the run here, within a step
                stop = preempt.should_stop(step)
                evaluating = t.eval_every and (step % t.eval_every == 0 or step == t.steps)
                if step % t.log_every == 0 or evaluating or stop or step == t.steps:
                    fetched = jax.device_get(pending)
                    pending = []
                    for row in fetched:  # skipped steps in a row, up to this one
                        skips_in_row = skips_in_row + 1 if bool(row["skipped"]) else 0
                    m = _mean(fetched)
                    now = time.perf_counter()
                    m["step_time_s"] = (now - tick) / (step - tick_step)
                    m["tokens_per_sec"] = m.pop("tokens") / (now - tick)
                    m["skipped_total"] = float(jax.device_get(state.skipped))
                    m["data_wait_s"] = _data_wait(data_wait / (step - tick_step), m["step_time_s"], nproc)
                    data_wait = 0.0
                    if peak:
                        m["mfu"] = fpt * m["tokens_per_sec"] / (peak * jax.device_count())
                    if evaluating:
                        m.update(trainer.evaluate(state.params, eval_batches))
                        if unigram is not None:
                            m["eval/unigram_loss"] = unigram
                    writer.write(step, m)
                    proc_log.step(step, t.steps, m)
                    if t.max_consecutive_skips and skips_in_row >= t.max_consecutive_skips:
                        raise NonFiniteRun(
                            f"{skips_in_row} steps in a row up to step {step} were skipped (non-finite loss, gradient "
                            f"or update), so the run stops; checkpoint {ckpt.latest_step()} is the last one saved; "
                            "resume from it with a lower optim.lr / optim.muon_lr")
                    last = m
                    tick, tick_step = time.perf_counter(), step
                if stop or (config.ckpt.every and step % config.ckpt.every == 0) or step == t.steps:
                    if not owns_workdir():
                        raise WorkdirBusy(f"{workdir}: another trainer took over this workdir's lock (the lease "
                                          "was not renewed in time); this run stops without saving step "
                                          f"{step}; checkpoint {ckpt.latest_step()} is its last")
                    writer.sync()  # first: a committed checkpoint never has metrics rows still to upload
                    saved = ckpt.save(step, state, data_iter, config_dict, wait=stop or step == t.steps)
                if stop:
                    logging.warning("stopped by %s after step %d; %s", signal.Signals(preempt.signum).name, step,
                                    "checkpoint saved" if saved else "NO checkpoint: the parameters are not finite")
                    break
    finally:
        preempt.restore_handler()
        profiler.after(None, state)
        ckpt.close()
        writer.close()
        proc_log.close()
        if hasattr(data_iter, "close"):
            data_iter.close()
    if preempt.requested:
        raise Interrupted(preempt.signum, step)
    return last


def evaluate_checkpoint(config, workdir: str, run: Run, trainer: Trainer | None = None) -> dict[str, Any]:
    """--mode=eval: validation loss of the latest checkpoint at every eval recurrence."""
    trainer = trainer or Trainer(config, run)
    directory = RunDir(workdir).checkpoints
    if not directory.exists():  # and create nothing in a misspelled workdir
        raise CheckpointError(f"no checkpoint in {directory}; train first (--mode=train)")
    ckpt = Checkpointer(directory, config.ckpt.keep)
    data = dataset.open_data(config.data, run.tokenizer)
    with trainer.context():
        target = abstract_with_shardings(trainer.abstract, trainer.state_sharding)
        model_only = lambda saved, step: resume.check(  # noqa: E731 - another model cannot load these weights
            {"model": saved["model"]}, {"model": config.model.to_dict()}, step, None,
            fix="evaluate with the config the run was trained with")
        found = ckpt.restore_newest(target, check=model_only, set_aside=False)  # eval writes nothing
        if found is None:
            raise CheckpointError(f"no checkpoint in {ckpt.directory}; train first (--mode=train)")
        latest, state = found
        batches = [to_global(b, trainer.batch_sharding) for b in trainer.local_eval_batches(data)]
        out = {"step": latest, **trainer.evaluate(state.params, batches)}
    ckpt.close()
    return out
