"""--mode=bench: compile the train step for the config and time it on random tokens.

Prints one JSON object: tokens_per_sec (median over timed steps after warm-up, each
synchronised), step_time_s, compile_s, temp_bytes (XLA's memory analysis of the
compiled step), flops_per_token (describe.py), achieved_flops_per_sec (model FLOPs) and
executed_flops_per_sec (plus rematerialisation), and the device. The matmul roofs are timed
in the same process (roof.py): executed_fraction_of_fp32_roof and _of_bf16_roof are the
machine-independent efficiency figures. On accelerators also `mfu` / `mfu_executed` (model
and executed FLOPs over the vendor's dense bf16 peak, roof.PUBLISHED_BF16_PEAKS) and
`peak_bytes_in_use` (the device allocator's high-water mark over compile and steps). With
`bench.breakdown_steps=N`, N more steps are traced and `breakdown` says where their time
went (matmuls with their GFLOP/s, element-wise work, reductions, layout copies; breakdown.py).

With `bench.compile_only=True` nothing is allocated: the sharded step is lowered from
abstract shapes and compiled ahead of time, and the JSON gives XLA's per-device memory
analysis. On a fake CPU mesh (XLA_FLAGS=--xla_force_host_platform_device_count=N) this
checks that a pod-sized config builds and compiles for an N-device mesh, on a laptop.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from parcae_jax.bench.breakdown import breakdown
from parcae_jax.bench.roof import measure_roof, published_bf16_peak
from parcae_jax.runtime import huge_pages
from parcae_jax.runtime.checkpoint import abstract_with_shardings
from parcae_jax.training.describe import flops_per_token
from parcae_jax.training.train import Trainer
from parcae_jax.training.validate import Run


def _memory(compiled) -> dict:
    """XLA's per-device memory analysis of a compiled function (bytes; None where unknown)."""
    m = compiled.memory_analysis()
    fields = ("temp", "argument", "output", "alias", "generated_code")
    out = {f"{f}_bytes": int(getattr(m, f"{f}_size_in_bytes")) if m else None for f in fields}
    if m:  # donated arguments alias their outputs: counted once
        out["total_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
    return out


def lower_only(config, run: Run) -> tuple[Trainer, jax.stages.Lowered]:
    """The trainer and its sharded train step lowered from abstract shapes (StableHLO with the
    shardings of every argument and constraint; no XLA compile, nothing allocated)."""
    trainer = Trainer(config, run)
    B, T = config.train.batch_size, run.model.seq_len
    state = abstract_with_shardings(trainer.abstract, trainer.state_sharding)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=trainer.batch_sharding)
             for k in ("inputs", "targets", "segment_ids")}
    with trainer.context():
        return trainer, trainer.train_step.lower(state, batch, trainer.schedule)


def compile_only(config, run: Run) -> dict:
    """Lowers and compiles the sharded train step from abstract shapes; allocates nothing."""
    B, T = config.train.batch_size, run.model.seq_len
    start = time.perf_counter()
    trainer, lowered = lower_only(config, run)
    lower_s = time.perf_counter() - start
    with trainer.context():
        # Nothing will run, so the CPU backend may skip LLVM's optimisations (half the compile
        # time); the memory analysis comes from XLA's buffer assignment and is unchanged.
        fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
        compiled = lowered.compile(compiler_options=fast if jax.default_backend() == "cpu" else None)
        compile_s = time.perf_counter() - start - lower_s
    return {"compile_only": True, "lower_s": lower_s, "compile_s": compile_s, **_memory(compiled),
            "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract.params)),
            "mesh_shape": list(run.mesh_shape), "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "batch_size": B, "seq_len": T,
            "microbatches": config.train.microbatches, "dtype": run.model.dtype}


def bench(config, run: Run) -> dict:
    if config.bench.compile_only:
        return compile_only(config, run)
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
        compiled = trainer.train_step.lower(state, batch(), trainer.schedule).compile()
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        times = []
        for _ in range(config.bench.warmup + config.bench.steps):
            b = batch()
            start = time.perf_counter()
            state, metrics = compiled(state, b, trainer.schedule)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - start)
        traced = {}
        if config.bench.breakdown_steps:  # after the timed steps, so the trace costs them nothing
            def step():
                nonlocal state
                state, metrics = compiled(state, batch(), trainer.schedule)
                jax.block_until_ready(metrics["loss"])
            traced = {"breakdown": breakdown(compiled, step, config.bench.breakdown_steps)}
    step_time = float(np.median(times[config.bench.warmup:]))
    tps = B * T / step_time
    flops = flops_per_token(run.model)
    fpt = flops["flops_per_token"]
    executed = (fpt + flops.get("remat_recompute_flops_per_token", 0)) * tps  # what the machine ran
    roof = measure_roof()
    peak = published_bf16_peak(jax.devices()[0].device_kind)
    peak = peak * jax.device_count() if peak else None
    stats = jax.devices()[0].memory_stats() or {}  # None on CPU
    return {
        "tokens_per_sec": tps, "step_time_s": step_time, "step_times_s": times[config.bench.warmup:],
        "compile_s": compile_s, "temp_bytes": int(memory.temp_size_in_bytes) if memory else None,
        "flops_per_token": fpt, "achieved_flops_per_sec": fpt * tps, "executed_flops_per_sec": executed, **roof,
        "executed_fraction_of_fp32_roof": executed / roof["roof_fp32_flops_per_sec"],
        "executed_fraction_of_bf16_roof": executed / roof["roof_bf16_flops_per_sec"],
        # MFU against the vendor's dense bf16 peak (accelerators): model FLOPs, and executed ones
        "mfu": fpt * tps / peak if peak else None, "mfu_executed": executed / peak if peak else None,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "dtype": run.model.dtype,
        "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
        "batch_size": B, "seq_len": T, "mean_recurrence": run.model.mean_recurrence,
        "mean_backprop_depth": run.model.mean_backprop_depth, "allocator": huge_pages.in_force(), **traced,
    }
