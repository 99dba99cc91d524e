"""--mode=bench: compile the train step for the config and time it on random tokens.

Prints one JSON object: tokens_per_sec (median over timed steps after warm-up, each
synchronised), step_time_s, compile_s, temp_bytes (XLA's memory analysis of the
compiled step), flops_per_token (describe.py), achieved_flops_per_sec and the device.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from parcae_jax.describe import flops_per_token
from parcae_jax.train import Trainer
from parcae_jax.validate import Run


def bench(config, run: Run) -> dict:
    trainer = Trainer(config, run)
    B, T = config.train.batch_size, run.model.seq_len
    rng = np.random.default_rng(config.seed)
    with trainer.context():
        state = trainer.fresh_state()

        def batch():
            ids = rng.integers(0, run.model.vocab_size, (B, T + 1), dtype=np.int32)
            local = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((B, T), np.int32)}
            return {k: jax.device_put(v, trainer.batch_sharding) for k, v in local.items()}

        start = time.perf_counter()
        compiled = trainer.train_step.lower(state, batch()).compile()
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        times = []
        for i in range(config.bench.warmup + config.bench.steps):
            b = batch()
            start = time.perf_counter()
            state, metrics = compiled(state, b)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - start)
    step_time = float(np.median(times[config.bench.warmup:]))
    tps = B * T / step_time
    fpt = flops_per_token(run.model)["flops_per_token"]
    return {
        "tokens_per_sec": tps, "step_time_s": step_time, "step_times_s": times[config.bench.warmup:],
        "compile_s": compile_s, "temp_bytes": int(memory.temp_size_in_bytes) if memory else None,
        "flops_per_token": fpt, "achieved_flops_per_sec": fpt * tps,
        "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
        "batch_size": B, "seq_len": T, "mean_recurrence": run.model.mean_recurrence,
        "mean_backprop_depth": run.model.mean_backprop_depth,
    }
