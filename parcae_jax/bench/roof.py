"""The machine's matmul roof, measured in the process that benchmarks the step.

tokens/s depends on the machine; the fraction of the machine's own matmul speed does much
less. Two roofs are timed on one device: a float32 GEMM and a bfloat16 x bfloat16 -> float32
GEMM (`preferred_element_type=float32`, the dot a bfloat16 step should run; on CPUs with
BF16 instructions it is about twice the float32 rate). Each is the best of a few runs of a
square matmul large enough to saturate the device.
"""

from __future__ import annotations

import platform
import time

import jax
import jax.numpy as jnp

# Square GEMM sizes: large enough to reach the roof, small enough to take about a second.
SIZES = {"cpu": 2048, "gpu": 8192, "tpu": 8192}

# Published dense bf16 peak FLOP/s per chip, for MFU: (substring of jax's device_kind, peak).
# First match wins, so the more specific names come first.
PUBLISHED_BF16_PEAKS = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L4", 121e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v4", 275e12),
)


def cpu_name() -> str:
    """The host CPU's model name (/proc/cpuinfo), to name the machine beside every figure."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


def published_bf16_peak(device_kind: str) -> float | None:
    """The vendor's dense bf16 FLOP/s for one chip of this kind; None if unknown (CPUs)."""
    return next((peak for name, peak in PUBLISHED_BF16_PEAKS if name.lower() in device_kind.lower()), None)


def gemm_flops_per_sec(dtype, n: int, repeats: int = 5, device=None) -> float:
    """Best-of-`repeats` FLOP/s of an [n, n] @ [n, n] product in `dtype`, accumulated in float32."""
    device = device or jax.devices()[0]
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.device_put(jax.random.normal(k, (n, n), jnp.float32).astype(dtype), device) for k in keys)
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    matmul(a, b).block_until_ready()  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def measure_roof(n: int | None = None) -> dict:
    """Both roofs, for the whole job: per device x device count on accelerators; on CPU the
    (possibly fake, core-sharing) devices are one machine, so one device's roof is the machine's."""
    backend = jax.default_backend()
    n = n or SIZES.get(backend, 4096)
    scale = 1 if backend == "cpu" else jax.device_count()
    return {"roof_gemm_size": n,
            "roof_fp32_flops_per_sec": scale * gemm_flops_per_sec(jnp.float32, n),
            "roof_bf16_flops_per_sec": scale * gemm_flops_per_sec(jnp.bfloat16, n)}


def memory_bytes_per_sec(n_bytes: int = 1 << 28, repeats: int = 5) -> float:
    """Best-of-`repeats` bytes/s of reading and writing an `n_bytes` float32 array once, in place
    (y = x + 1, x donated: a fresh output would also pay its page faults): the roof of work
    bound by memory traffic, such as decoding."""
    add = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = add(jnp.ones((n_bytes // 4,), jnp.float32))
    x.block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x = add(x)
        x.block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n_bytes / best
