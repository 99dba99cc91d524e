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
import numpy as np

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
              per_device=lambda kernel, tables=None: kernel, rope=None, norm_eps: float | None = None) -> jax.Array:
    """Causal GQA attention with the fused CPU kernel; float32 [B,T,H,D].

    With `rope` ((cos, sin) tables, [T, 1, D/2] or [B, T, 1, D/2], rope.py) q and k arrive raw
    and the kernel rotates them, and with `norm_eps` also qk-norms them (eps = norm_eps), as
    apply_rope then qk_norm would: its backward returns the gradients of the raw q and k.
    Without, q and k arrive rotated and normed. `per_device` wraps the kernel for the mesh in
    use (attention_kernels.per_device: shard_map with the activations' logical sharding, since
    XLA cannot partition a custom call).
    """
    B, T, H, D = q_BxTxHxD.shape
    why = unfit(D, T)
    if why:  # resolve_impl checks first; this guards direct callers
        raise ValueError(f"the CPU attention kernel {why}")
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids_BxT is None else segment_ids_BxT.astype(jnp.int32)
    q = q_BxTxHxD.astype(jnp.float32)
    statics = dict(bf16=jnp.dtype(dtype) == jnp.bfloat16, bounded=bool(bounded), rope=rope is not None,
                   norm=norm_eps is not None, eps=float(norm_eps or 0.0))
    if rope is None and norm_eps is None:
        q = q * (1.0 / math.sqrt(D))  # the XLA path's scale, before rounding
        cos = sin = jnp.zeros((1, 1, 1), jnp.float32)  # not read
        statics["scale"] = 1.0
    else:  # the kernel scales the processed rows, in the same order
        statics["scale"] = float(np.float32(1.0 / math.sqrt(D)))
        cos, sin = ((jnp.zeros((1, 1, 1), jnp.float32) if rope is None
                     else jnp.asarray(t, jnp.float32).reshape(-1, T, D // 2)) for t in (rope or (0, 0)))
    kernel = per_device(functools.partial(_fused, **statics), tables=cos.shape[0] == B and B > 1)
    return kernel(q, k_BxTxGxD.astype(jnp.float32), v_BxTxGxD.astype(jnp.float32), seg, cos, sin)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11))
def _fused(q, k, v, seg, cos, sin, bf16: bool, bounded: bool, rope: bool, norm: bool, eps: float, scale: float):
    return _forward(q, k, v, seg, cos, sin, bf16, bounded, rope, norm, eps, scale)[0]


def _forward(q, k, v, seg, cos, sin, bf16, bounded, rope, norm, eps, scale):
    B, T, H, _ = q.shape
    out, lse = jax.ffi.ffi_call("parcae_attention_fwd", (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                                         jax.ShapeDtypeStruct((B, H, T), jnp.float32)))(
        q, k, v, seg, cos, sin, bf16=bf16, bounded=bounded, rope=rope, norm=norm, eps=np.float32(eps),
        scale=np.float32(scale))
    return out, (q, k, v, seg, cos, sin, out, lse)


def _backward(bf16, bounded, rope, norm, eps, scale, residuals, dout):
    q, k, v, seg, cos, sin, out, lse = residuals
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call("parcae_attention_bwd", shapes)(
        q, k, v, seg, cos, sin, out, lse, dout.astype(jnp.float32), bf16=bf16, rope=rope, norm=norm,
        eps=np.float32(eps), scale=np.float32(scale))
    return dq, dk, dv, None, None, None


_fused.defvjp(_forward, _backward)


def prefill(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids_BxT, k_slot, v_slot, dtype, bounded: bool, rope,
            norm_eps: float | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A generation prefill's attention: (out [B,T,H,D] float32, k_slot, v_slot), the slots
    ([B*G, S, D] float32, S >= T) with rows 0..T-1 of each (batch, kv head) now this call's keys
    (RoPE'd and qk-normed as in `attention`) and values, the rows after as they were. No
    gradient; no mesh (the caller checks)."""
    B, T, H, D = q_BxTxHxD.shape
    why = unfit(D, T)
    if why:
        raise ValueError(f"the CPU attention kernel {why}")
    cos, sin = (jnp.asarray(t, jnp.float32).reshape(-1, T, D // 2) for t in rope)
    out_shapes = (jax.ShapeDtypeStruct(q_BxTxHxD.shape, jnp.float32), jax.ShapeDtypeStruct(k_slot.shape, jnp.float32),
                  jax.ShapeDtypeStruct(v_slot.shape, jnp.float32))
    return jax.ffi.ffi_call("parcae_attention_prefill", out_shapes, input_output_aliases={6: 1, 7: 2})(
        q_BxTxHxD.astype(jnp.float32), k_BxTxGxD.astype(jnp.float32), v_BxTxGxD.astype(jnp.float32),
        segment_ids_BxT.astype(jnp.int32), cos, sin, k_slot, v_slot, bf16=jnp.dtype(dtype) == jnp.bfloat16,
        bounded=bool(bounded), rope=True, norm=norm_eps is not None, eps=np.float32(norm_eps or 0.0),
        scale=np.float32(1.0 / math.sqrt(D)))
