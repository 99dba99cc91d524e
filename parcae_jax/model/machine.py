"""What the machine at hand decides about how a model config runs: its "auto" and "fast"
choices resolved for the backend JAX runs on and, on a CPU, for the instructions it has
(compute dtype, the loop's remat policy and scan unrolling, the dtype for inference).
Read by config.py's properties and by the inference commands; imports nothing of the
package, so configs stay readable without initialising a backend until a choice is asked for."""

from __future__ import annotations

import functools


def resolve_dtype(name: str) -> str:
    """"auto" -> bfloat16 on accelerators, float32 on CPU; "fast" -> bfloat16 on accelerators
    and on CPUs with BF16 dot instructions, else float32; any other name unchanged."""
    if name not in ("auto", "fast"):
        return name
    import jax  # here, so that configs can be read without initialising a backend

    if jax.default_backend() != "cpu":
        return "bfloat16"
    return "bfloat16" if name == "fast" and cpu_has_bf16_dots() else "float32"


def resolve_remat_policy(name: str) -> str:
    """"auto" -> "dots_attention" on XLA:CPU, else "full"; any other name unchanged. On a CPU
    the gradient iterations keep their matmul and attention-kernel outputs (bench_cpu's bf16
    step +5% on Zen 4, docs/model.md); accelerators recompute: memory bounds their batch."""
    if name != "auto":
        return name
    import jax

    return "dots_attention" if jax.default_backend() == "cpu" else "full"


def resolve_scan_unroll(name: str) -> str:
    """"auto" -> "full" on XLA:CPU (bench_cpu +2-3.5% a step on Zen 4 for 13-19% more
    temporaries, docs/model.md), else "none": accelerators keep the loop's smaller footprint."""
    if name != "auto":
        return name
    import jax

    return "full" if jax.default_backend() == "cpu" else "none"


def inference_dtype(requested: str | None) -> str | None:
    """The compute dtype for scoring and decoding a trained model: `requested`, else float32 on
    CPU, else None (the checkpoint's own). On CPU decoding is bound by memory reads, and
    XLA:CPU's bfloat16 products over the cache run slower than float32 ones (bench_cpu shape,
    batch 8, 1024-token prompts: 76 ms a step in bfloat16, 14 in float32)."""
    if requested:
        return requested
    import jax

    return "float32" if jax.default_backend() == "cpu" else None


_BF16_DOT_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names; XLA:CPU's bf16 dots use them


@functools.cache
def cpu_has_bf16_dots(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this x86 CPU has BF16 dot-product instructions (Zen 4 and later, Cooper Lake,
    Sapphire Rapids and later), where bf16 x bf16 -> f32 matmuls run at up to twice the
    float32 rate. False where /proc/cpuinfo is missing (macOS) or names neither flag (Arm: a
    BF16 extension exists, but its speed under XLA:CPU is unmeasured here)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in _BF16_DOT_FLAGS)
    except OSError:
        pass
    return False
