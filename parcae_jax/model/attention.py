"""Causal self-attention: interleaved RoPE (rope.py), weightless qk-norm after RoPE, GQA, value embeddings.

Shapes: B batch, T length, H query heads, G kv heads, D head dim, W block width.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from parcae_jax.model import attention_kernels, matmul
from parcae_jax.model.config import ModelConfig
from parcae_jax.model.init import matrix_init, torch_linear_default
from parcae_jax.model.kv_slots import CacheView
from parcae_jax.model.layout import BlockSpec
from parcae_jax.model.rope import Rope, apply_rope, pairs_to_halves
from parcae_jax.model.softmax_attention import attend_block, causal_blocks, dot_product_attention


def qk_norm(x: jax.Array) -> jax.Array:
    """RMS norm over D with no weight and eps = machine epsilon of x's dtype (torch's rms_norm default)."""
    eps = jnp.finfo(x.dtype).eps
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def kernel_prefills(cache: CacheView, impl: str, dtype, D: int, T: int, heads: tuple[int, int, int]) -> bool:
    """Whether the CPU kernel runs this prefill whole: RoPE, qk-norm, attention and the writes to
    a float32 cache (cpu_attention.prefill). Not the last block's (one query), nor under a mesh."""
    return (cache.fresh and not cache.last_only and cache.k.dtype == jnp.float32 and impl in ("auto", "cpu")
            and jax.sharding.get_abstract_mesh().empty
            and attention_kernels.resolve_impl("auto", dtype, D, T, True, heads) == "cpu")


def cached_attention(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, cache: CacheView, bounded: bool, dtype, impl: str = "xla"):
    """Writes k and v into the cache slot, then attends over it: ([B, T, H, D], the slot's (k, v)).

    The keys are all S positions of the slot, masked (static shapes: one compiled decode step
    serves every position), so a decode step reads the whole slot once, as it must. A prefill
    (`cache.fresh`) runs the CPU kernel when `impl` ("auto" or "cpu") resolves to it. With
    `cache.last_only` q holds the last new token only ([B, 1, H, D]) and so does the output."""
    (_, Tq, H, _), (B, T, G, D) = q_BxTxHxD.shape, k_BxTxGxD.shape
    k_all, v_all = (jax.lax.dynamic_update_slice(
        c, a.transpose(0, 2, 1, 3).reshape(B * G, T, D).astype(c.dtype), (0, cache.start, 0))
        for c, a in ((cache.k, k_BxTxGxD), (cache.v, v_BxTxGxD)))
    if cache.fresh and Tq < T:  # the last query only, over the new keys
        q = (q_BxTxHxD * (1.0 / math.sqrt(D))).reshape(B, Tq, G, H // G, D)
        y = attend_block(q, k_BxTxGxD, v_BxTxGxD, cache.mask[..., T - Tq:T, :T], bounded, dtype)
        return y.transpose(0, 3, 1, 2, 4).reshape(B, Tq, H, D), (k_all, v_all)
    if cache.fresh:  # every key this call reads is its own: attend among the new tokens
        # "cpu" too falls back here instead of refusing: a prompt's length is the request's, not a config's
        if impl in ("auto", "cpu") and attention_kernels.resolve_impl("auto", dtype, D, T, True, (B, H, G)) == "cpu":
            # Left padding as documents: a key is real iff the row's last query (always a real
            # token) reads it. Real queries then read exactly the real keys up to themselves;
            # padding queries read padding keys, as no real query does (cache_mask: only itself).
            seg_BxT = cache.mask[:, 0, 0, T - 1, :T].astype(jnp.int32)
            y = dot_product_attention(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, seg_BxT, "cpu", bounded, dtype)
            return y, (k_all, v_all)
        return causal_blocks(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, cache.mask[..., :T], bounded, dtype), (k_all, v_all)
    S, R = k_all.shape[1], H // G
    q = (q_BxTxHxD * (1.0 / math.sqrt(D))).reshape(B, Tq, G, R, D).transpose(0, 2, 3, 1, 4).reshape(B * G, R * Tq, D)
    s_NxQxS = matmul.einsum("nqd,nsd->nqs", q, k_all, dtype)
    s_BxGxRxTxS = jnp.where(cache.mask[..., T - Tq:, :], s_NxQxS.reshape(B, G, R, Tq, S), -jnp.inf)
    if not bounded:
        s_BxGxRxTxS = s_BxGxRxTxS - jnp.max(s_BxGxRxTxS, axis=-1, keepdims=True)
    p = jnp.exp(s_BxGxRxTxS)
    y = matmul.einsum("nqs,nsd->nqd", p.reshape(B * G, R * Tq, S), v_all, dtype)
    y = y.reshape(B, G, R, Tq, D) / jnp.sum(p, axis=-1, keepdims=True)
    return y.transpose(0, 3, 1, 2, 4).reshape(B, Tq, H, D), (k_all, v_all)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def split_last(y: jax.Array, widths: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """y cut along its last axis into pieces of `widths` (q, k and v from one matmul).

    The backward joins the pieces' cotangents with one concatenate; autodiff of slicing
    would pad each cotangent to the full width and add them (3 pads, 2 adds: ~2x the traffic).
    """
    return tuple(jnp.split(y, np.cumsum(widths)[:-1].tolist(), axis=-1))


def _split_last_fwd(y, widths):
    return split_last(y, widths), None


def _split_last_bwd(widths, _, dys):
    return (jnp.concatenate(dys, axis=-1),)


split_last.defvjp(_split_last_fwd, _split_last_bwd)


class _Kernel(nn.Module):
    """A bare weight, so that a fused projection keeps the `q/kernel`, ... parameter names."""

    shape: tuple[int, ...]
    initializer: object
    axes: tuple

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", nn.with_logical_partitioning(self.initializer, self.axes), self.shape, jnp.float32)


class Attention(nn.Module):
    """Projections, value-embedding gate, RoPE, qk-norm, attention, output projection."""

    spec: BlockSpec
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BxTxW, rope: Rope, ve_BxTxK=None, segment_ids_BxT=None, cache: CacheView | None = None):
        """The output [B, T, W]; with a `cache`, (output, (k, v)) with this call's keys written."""
        spec, cfg = self.spec, self.cfg
        dtype = jnp.dtype(cfg.compute_dtype)
        std = math.sqrt(2.0 / (5.0 * spec.width))
        D, H, G = spec.head_dim, spec.n_heads, spec.n_kv_heads

        init = matrix_init(std, cfg.init_orthogonal)
        W = spec.width
        Wq = _Kernel((W, H, D), init, ("embed", "heads", "head_dim"), name="q")()
        Wk = _Kernel((W, G, D), init, ("embed", "kv_heads", "head_dim"), name="k")()
        Wv = _Kernel((W, G, D), init, ("embed", "kv_heads", "head_dim"), name="v")()
        perm = pairs_to_halves(D)  # q, k channels in the order apply_rope wants (see there)
        B, T = h_BxTxW.shape[:2]
        # init only needs the shapes, traced at a dummy length no kernel may take: the XLA path
        impl = "xla" if self.is_initializing() else cfg.attention_impl
        # The CPU kernel rotates and normalises q and k as it reads them (cpu_kernels/rope_norm.h),
        # and where every device holds every head reads q, k and v in place from the projection's
        # output (packed): a trainer's one-device or data-parallel mesh included.
        if cache is None:
            segments = segment_ids_BxT is not None
            in_kernel = attention_kernels.resolve_impl(impl, dtype, D, T, segments, (B, H, G)) == "cpu"
        else:
            in_kernel = kernel_prefills(cache, impl, dtype, D, T, (B, H, G))
        packed = in_kernel and attention_kernels.heads_whole()
        if cache is None or cache.fresh:  # one matmul instead of three; its weight is rebuilt per call,
            # amortised over B x T tokens, with q's and k's channels permuted on the way
            Wqkv = jnp.concatenate([jnp.asarray(Wq)[..., perm].reshape(W, H * D),
                                    jnp.asarray(Wk)[..., perm].reshape(W, G * D),
                                    jnp.asarray(Wv).reshape(W, G * D)], axis=1)
            qkv = matmul.einsum("btw,wf->btf", h_BxTxW, Wqkv, dtype)
            if packed:  # v read out only where a value embedding is added to it
                v = qkv[..., (H + G) * D:].reshape(B, T, G, D)
            else:
                q, k, v = split_last(qkv, (H * D, G * D, G * D))
                q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, G, D), v.reshape(B, T, G, D)
        else:  # a decode step: a few tokens, so the weights are read as stored and the few q, k rows
            # permuted instead; the cache holds k in the permuted order, as a prefill writes it
            q, k, v = (matmul.einsum("btw,wgd->btgd", h_BxTxW, jnp.asarray(w), dtype) for w in (Wq, Wk, Wv))
            q, k = q[..., perm], k[..., perm]
        if cache is not None and cache.last_only:  # keys and values of every token, the last one's query
            q, rope_q = q[:, -1:], tuple(t[..., -1:, :, :] for t in rope)
        else:
            rope_q = rope
        own_v = None  # packed: a v the kernel reads instead of qkv's
        if spec.gate:  # created even where no table exists, as the official model does
            c = cfg.ve_gate_channels
            gate_kernel = self.param("ve_gate",
                                     nn.with_logical_partitioning(torch_linear_default(c), (None, "kv_heads")),
                                     (c, G), jnp.float32)
            if ve_BxTxK is not None:
                gate_BxTxG = 2.0 * jax.nn.sigmoid(matmul.einsum("btc,cg->btg", h_BxTxW[..., :c], gate_kernel, dtype))
                # packed: the kernel's gradient for qkv already holds dv in qkv's v part
                v = (jax.lax.stop_gradient(v) if packed else v) + gate_BxTxG[..., None] * ve_BxTxK.reshape(v.shape)
                own_v = v
        eps = float(jnp.finfo(jnp.float32).eps) if cfg.qk_norm else None  # qk_norm's, for the float32 q and k
        Wo = _Kernel((H, D, W), matrix_init(0.0, cfg.init_orthogonal, 2), ("heads", "head_dim", "embed"), name="o")()
        out = lambda y: matmul.einsum("bthd,hdw->btw", y, jnp.asarray(Wo), dtype)  # noqa: E731
        if packed:
            from parcae_jax.model.cpu_kernels import attention as cpu_attention

            if cache is not None:  # kernel_prefills: left padding as documents, as cached_attention passes it
                seg_BxT = cache.mask[:, 0, 0, T - 1, :T].astype(jnp.int32)
                y, k_all, v_all = cpu_attention.prefill(qkv, own_v, seg_BxT, (H, G, D), cache.k, cache.v, dtype,
                                                        cfg.qk_norm, rope, eps)
                return out(y), (k_all, v_all)
            return out(cpu_attention.attention_packed(qkv, own_v, segment_ids_BxT, (H, G, D), dtype, cfg.qk_norm,
                                                      rope, eps, attention_kernels.per_device_packed))
        if not in_kernel:
            q, k = apply_rope(q, rope_q), apply_rope(k, rope)
            if cfg.qk_norm:
                q, k = qk_norm(q), qk_norm(k)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        if cache is not None:
            y, kv = cached_attention(q, k, v, cache, cfg.qk_norm, dtype, cfg.attention_impl)
            return out(y), kv
        if in_kernel:  # under a mesh: per device, q, k and v cut apart
            from parcae_jax.model.cpu_kernels import attention as cpu_attention

            return out(cpu_attention.attention(q, k, v, segment_ids_BxT, dtype, cfg.qk_norm,
                                               attention_kernels.per_device, rope=rope, norm_eps=eps))
        return out(dot_product_attention(q, k, v, segment_ids_BxT, impl, bounded=cfg.qk_norm, dtype=dtype))
