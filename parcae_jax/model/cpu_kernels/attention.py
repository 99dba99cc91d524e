"""model.attention_impl="cpu": attention.cc's fused causal attention as JAX functions.

`attention` takes what the XLA path takes (q [B,T,H,D], k/v [B,T,G,D]; segment ids [B,T] or
None), either RoPE'd and qk-normed or raw with the RoPE tables (the kernel then rotates and
normalises them itself); `attention_packed` reads q, k, v in place from the fused projection's
output; `prefill` also writes a generation cache. All return float32 [B,T,H,D] with the XLA
path's arithmetic: q scaled by 1/sqrt(D) in float32 first, products in the compute dtype
(bfloat16 operands rounded to nearest even, float32 accumulation), a float32 softmax, the max
subtraction skipped when `bounded`. The forward keeps the row log-sum-exp; the backward
recomputes the probabilities from it (nothing T x T is stored between the passes).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

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


def _tables(rope, B: int, T: int, D: int) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [1 or B, T, D/2] float32, or placeholders the kernel does not read."""
    if rope is None:
        return jnp.zeros((1, 1, 1), jnp.float32), jnp.zeros((1, 1, 1), jnp.float32)
    return tuple(jnp.asarray(t, jnp.float32).reshape(-1, T, D // 2) for t in rope)


class _Statics(NamedTuple):
    """A call's attributes: the kernel's flags and where q, k, v sit in their buffers."""

    bf16: bool
    bounded: bool
    rope: bool
    norm: bool
    eps: float
    scale: float
    heads: int
    kv_heads: int
    head_dim: int
    offsets: tuple[int, int, int]

    def attrs(self) -> dict:
        return dict(rope=self.rope, norm=self.norm, eps=np.float32(self.eps), scale=np.float32(self.scale),
                    heads=np.int64(self.heads), kv_heads=np.int64(self.kv_heads), head_dim=np.int64(self.head_dim),
                    q_off=np.int64(self.offsets[0]), k_off=np.int64(self.offsets[1]), v_off=np.int64(self.offsets[2]))


def _statics(dtype, bounded, rope, norm_eps, H: int, G: int, D: int, offsets=(0, 0, 0)) -> _Statics:
    return _Statics(bool(jnp.dtype(dtype) == jnp.bfloat16), bool(bounded), rope is not None, norm_eps is not None,
                    float(norm_eps or 0.0), float(np.float32(1.0 / math.sqrt(D))), H, G, D, tuple(offsets))


def _check(D: int, T: int) -> None:
    why = unfit(D, T)
    if why:  # resolve_impl checks first; this guards direct callers
        raise ValueError(f"the CPU attention kernel {why}")


def attention(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids_BxT, dtype, bounded: bool,
              per_device=lambda kernel, tables=None: kernel, rope=None, norm_eps: float | None = None) -> jax.Array:
    """Causal GQA attention with the fused CPU kernel; float32 [B,T,H,D].

    With `rope` ((cos, sin) tables, [T, 1, D/2] or [B, T, 1, D/2], rope.py) q and k arrive raw
    and the kernel rotates them, and with `norm_eps` also qk-norms them (eps = norm_eps), as
    apply_rope then qk_norm would: its backward returns the gradients of the raw q and k.
    Without, q and k arrive rotated and normed. The kernel scales q by 1/sqrt(D) after that.
    `per_device` wraps the kernel for the mesh in use (attention_kernels.per_device: shard_map
    with the activations' logical sharding, since XLA cannot partition a custom call).
    """
    B, T, H, D = q_BxTxHxD.shape
    _check(D, T)
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids_BxT is None else segment_ids_BxT.astype(jnp.int32)
    cos, sin = _tables(rope, B, T, D)

    def kernel(q, k, v, seg, cos, sin):  # one device's heads (under a mesh), as [B, T, heads * D] rows
        st = _statics(dtype, bounded, rope, norm_eps, q.shape[2], k.shape[2], D)
        flat = lambda x: x.astype(jnp.float32).reshape(*x.shape[:2], -1)  # noqa: E731
        return _separate(flat(q), flat(k), flat(v), seg, cos, sin, st).reshape(q.shape)

    wrapped = per_device(kernel, tables=cos.shape[0] == B and B > 1)
    return wrapped(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, seg, cos, sin)


def attention_packed(qkv_BxTxF, v_BxTxGxD, segment_ids_BxT, heads: tuple[int, int, int], dtype, bounded: bool,
                     rope, norm_eps: float | None, per_device=lambda kernel, tables, own_v: kernel) -> jax.Array:
    """`attention` reading q, k and v in place from the fused projection's output qkv
    [B, T, (H + 2G) D] (q, then k, then v): XLA would otherwise copy each slice out for the
    call, and concatenate the three gradients back. `v_BxTxGxD`: a v of its own (the value
    embedding added to qkv's), whose gradient the kernel also writes into qkv's v part: the
    caller passes v = stop_gradient(qkv's v) + gate * ve, so that part is counted once.
    `per_device`: attention_kernels.per_device_packed under a mesh that keeps every head whole."""
    B, T, F = qkv_BxTxF.shape
    H, G, D = heads
    _check(D, T)
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids_BxT is None else segment_ids_BxT.astype(jnp.int32)
    cos, sin = _tables(rope, B, T, D)
    own = v_BxTxGxD is not None
    statics = _statics(dtype, bounded, rope, norm_eps, H, G, D, (0, H * D, 0 if own else (H + G) * D))

    def kernel(qkv, seg, cos, sin, *own_v):  # one device's rows (under a mesh)
        v = own_v[0] if own else jnp.zeros((0,), jnp.float32)
        return _packed(qkv, v, seg, cos, sin, statics).reshape(qkv.shape[0], T, H, D)

    extra = (v_BxTxGxD.astype(jnp.float32).reshape(B, T, G * D),) if own else ()
    wrapped = per_device(kernel, tables=cos.shape[0] == B and B > 1, own_v=own)
    return wrapped(qkv_BxTxF.astype(jnp.float32), seg, cos, sin, *extra)


def _call_forward(q, k, v, seg, cos, sin, st: _Statics):
    B, T = q.shape[:2]
    return jax.ffi.ffi_call(library.FORWARD_TARGET, (jax.ShapeDtypeStruct((B, T, st.heads, st.head_dim), jnp.float32),
                                                     jax.ShapeDtypeStruct((B, st.heads, T), jnp.float32)))(
        q, k, v, seg, cos, sin, bf16=st.bf16, bounded=st.bounded, **st.attrs())


def _call_backward(q, k, v, seg, cos, sin, out, lse, dout, shapes, st: _Statics, packed: bool):
    return jax.ffi.ffi_call(library.BACKWARD_TARGET, tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))(
        q, k, v, seg, cos, sin, out, lse, dout.astype(jnp.float32), bf16=st.bf16, packed=packed,
        dv_off=np.int64((st.heads + st.kv_heads) * st.head_dim), **st.attrs())


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _separate(q, k, v, seg, cos, sin, st: _Statics):
    return _call_forward(q, k, v, seg, cos, sin, st)[0]


def _separate_fwd(q, k, v, seg, cos, sin, st):
    out, lse = _call_forward(q, k, v, seg, cos, sin, st)
    return out, (q, k, v, seg, cos, sin, out, lse)


def _separate_bwd(st, residuals, dout):
    q, k, v, seg, cos, sin, out, lse = residuals
    dq, dk, dv = _call_backward(q, k, v, seg, cos, sin, out, lse, dout, (q.shape, k.shape, v.shape), st, False)
    return dq, dk, dv, None, None, None


_separate.defvjp(_separate_fwd, _separate_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _packed(qkv, v, seg, cos, sin, st: _Statics):
    return _call_forward(qkv, qkv, v if v.size else qkv, seg, cos, sin, st)[0]


def _packed_fwd(qkv, v, seg, cos, sin, st):
    out, lse = _call_forward(qkv, qkv, v if v.size else qkv, seg, cos, sin, st)
    return out, (qkv, v, seg, cos, sin, out, lse)


def _packed_bwd(st, residuals, dout):
    qkv, v, seg, cos, sin, out, lse = residuals
    dqkv, dv, _ = _call_backward(qkv, qkv, v if v.size else qkv, seg, cos, sin, out, lse, dout,
                                 (qkv.shape, v.shape, (0,)), st, True)
    return dqkv, (dv if v.size else None), None, None, None


_packed.defvjp(_packed_fwd, _packed_bwd)


def prefill(qkv_BxTxF, v_BxTxGxD, segment_ids_BxT, heads: tuple[int, int, int], k_slot, v_slot, dtype,
            bounded: bool, rope, norm_eps: float | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A generation prefill's attention, q, k, v read as attention_packed reads them: (out
    [B,T,H,D] float32, k_slot, v_slot), the slots ([B*G, S, D] float32, S >= T) with rows
    0..T-1 of each (batch, kv head) now this call's keys (RoPE'd and qk-normed as in
    `attention`) and values, the rows after as they were. No gradient; no mesh."""
    B, T, _ = qkv_BxTxF.shape
    H, G, D = heads
    _check(D, T)
    cos, sin = _tables(rope, B, T, D)
    own = v_BxTxGxD is not None
    qkv = qkv_BxTxF.astype(jnp.float32)
    v = v_BxTxGxD.astype(jnp.float32).reshape(B, T, G * D) if own else qkv
    st = _statics(dtype, bounded, rope, norm_eps, H, G, D, (0, H * D, 0 if own else (H + G) * D))
    shapes = ((B, T, H, D), k_slot.shape, v_slot.shape)
    return jax.ffi.ffi_call(library.PREFILL_TARGET, tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes),
                            input_output_aliases={6: 1, 7: 2})(
        qkv, qkv, v, segment_ids_BxT.astype(jnp.int32), cos, sin, k_slot, v_slot, bf16=st.bf16, bounded=st.bounded,
        **st.attrs())
