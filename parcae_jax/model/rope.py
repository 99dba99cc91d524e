"""Rotary position embeddings: the official interleaved (complex-pair) RoPE, and the channel
order training stores q and k in so that the rotation reads contiguous halves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from parcae_jax.model.config import ModelConfig

Rope = tuple[jax.Array, jax.Array]  # (cos, sin), each [T or BxT, 1, D/2] float32


def rope_angles(positions, head_dim: int, base: float, condense_ratio: float) -> Rope:
    """cos/sin of theta[t, m] = (t / condense) * base^(-2m/D), computed in float32.

    NumPy positions (the default 0..T-1) give NumPy tables, constants of the compiled
    step: XLA would otherwise fuse sin/cos into every consumer and recompute them there.
    """
    xp = np if isinstance(positions, np.ndarray) else jnp
    inv_freq = xp.float32(1.0) / (xp.float32(base)
                                  ** (xp.arange(0, head_dim, 2, dtype=xp.float32) / xp.float32(head_dim)))
    t = positions.astype(xp.float32) / xp.float32(condense_ratio)
    angles = t[..., None] * inv_freq  # [..., T, D/2]
    return xp.cos(angles)[..., None, :], xp.sin(angles)[..., None, :]


def ropes(cfg: ModelConfig, positions) -> tuple[Rope, Rope]:
    """(main, core) RoPE tables at `positions` ([T] or [B, T]); one table when the widths agree."""
    main = rope_angles(positions, cfg.head_dim, cfg.rope_base, cfg.rope_condense_ratio)
    core = main if cfg.rec_head_dim == cfg.head_dim else rope_angles(
        positions, cfg.rec_head_dim, cfg.rope_base, cfg.rope_condense_ratio)
    return main, core


def pairs_to_halves(D: int) -> np.ndarray:
    """Channel order (0, 2, 4, ..., 1, 3, 5, ...): interleaved pairs (2m, 2m+1) become (m, m + D/2)."""
    return np.concatenate([np.arange(0, D, 2), np.arange(1, D, 2)])


def apply_rope(x_BxTxHxD: jax.Array, rope: Rope) -> jax.Array:
    """Rotates channel pairs (m, m + D/2) of channels stored in `pairs_to_halves` order.

    This is the official interleaved (complex-pair) RoPE on pairs (2m, 2m+1), with q's and
    k's channels permuted the same way: the scores q.k and the qk-norm do not depend on
    channel order, and contiguous halves avoid XLA's interleaving copies.
    """
    cos, sin = rope
    x = x_BxTxHxD.astype(jnp.float32)
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    out = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return out.astype(x_BxTxHxD.dtype)


def apply_rope_interleaved(x_BxTxHxD: jax.Array, rope: Rope) -> jax.Array:
    """apply_rope for channels in the official order, pairs (2m, 2m+1): what generation uses,
    whose few tokens per call make permuting the weights (training's way) the larger cost.
    Scores and qk-norm do not depend on the channel order, so the two agree to rounding."""
    cos, sin = rope
    x = x_BxTxHxD.astype(jnp.float32).reshape(*x_BxTxHxD.shape[:-1], -1, 2)
    a, b = x[..., 0], x[..., 1]
    out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(x_BxTxHxD.shape)
    return out.astype(x_BxTxHxD.dtype)
