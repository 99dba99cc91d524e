"""model.attention_impl="cpu": attention.cc's fused causal attention as a JAX function.

Takes what attention.py's XLA path takes (q [B,T,H,D], k/v [B,T,G,D] float32, RoPE'd and
qk-normed; segment ids [B,T] or None) and returns float32 [B,T,H,D] with the same arithmetic:
q scaled by 1/sqrt(D) in float32 first, products in the compute dtype (bfloat16 operands
rounded to nearest even, float32 accumulation), a float32 softmax, the max subtraction skipped
when `bounded`. The forward keeps the row log-sum-exp; the backward recomputes the
probabilities from it (nothing T x T is stored between the passes).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from parcae_jax.model.cpu_kernels import library


def unfit(D: int, T: int) -> str | None:
    """Why the kernel cannot take these shapes here (None when it can)."""
    lib = library.load()
    if isinstance(lib, str):
        return lib
    if T % 16 or D % 16 or D > 256:
        return (f"needs a sequence length and a head_dim that are multiples of 16, the head_dim at most 256 "
                f"(got T={T}, D={D})")
    return None


def keys_per_query(T: int) -> float:
    """Average keys a query's scores and values are computed for: block c of b queries reads
    keys up to its own end."""
    if T <= 0:
        return 0.0
    lib = library.load()
    b = lib.query_block if isinstance(lib, library.Library) else 64
    return sum(min(t0 + b, T) * (min(t0 + b, T) - t0) for t0 in range(0, T, b)) / T


def attention(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids_BxT, dtype, bounded: bool,
              per_device=lambda kernel: kernel) -> jax.Array:
    """Causal GQA attention with the fused CPU kernel; float32 [B,T,H,D].

    `per_device` wraps the kernel for the mesh in use (attention_kernels.per_device: shard_map
    with the activations' logical sharding, since XLA cannot partition a custom call).
    """
    B, T, H, D = q_BxTxHxD.shape
    why = unfit(D, T)
    if why:  # resolve_impl checks first; this guards direct callers
        raise ValueError(f"the CPU attention kernel {why}")
    q = q_BxTxHxD.astype(jnp.float32) * (1.0 / math.sqrt(D))  # the XLA path's scale, before rounding
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids_BxT is None else segment_ids_BxT.astype(jnp.int32)
    kernel = per_device(functools.partial(_fused, bf16=jnp.dtype(dtype) == jnp.bfloat16, bounded=bool(bounded)))
    return kernel(q, k_BxTxGxD.astype(jnp.float32), v_BxTxGxD.astype(jnp.float32), seg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(q, k, v, seg, bf16: bool, bounded: bool):
    return _forward(q, k, v, seg, bf16, bounded)[0]


def _forward(q, k, v, seg, bf16, bounded):
    B, T, H, _ = q.shape
    out, lse = jax.ffi.ffi_call("parcae_attention_fwd", (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                                         jax.ShapeDtypeStruct((B, H, T), jnp.float32)))(
        q, k, v, seg, bf16=bf16, bounded=bounded)
    return out, (q, k, v, seg, out, lse)


def _backward(bf16, bounded, residuals, dout):
    q, k, v, seg, out, lse = residuals
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call("parcae_attention_bwd", shapes)(q, k, v, seg, out, lse, dout.astype(jnp.float32),
                                                                  bf16=bf16)
    return dq, dk, dv, None


_fused.defvjp(_forward, _backward)
