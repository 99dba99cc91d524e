"""Losses as pure functions of logits and targets."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = -100  # the official ignore_index: targets < 0 carry no loss


def token_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(per-token loss [B, T] float32, mask [B, T] of real targets). Every vocab row,
    padded ones included, takes part in the softmax, as in the official model."""
    logits = logits_BxTxV.astype(jnp.float32)
    mask = targets_BxT >= 0
    safe = jnp.where(mask, targets_BxT, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.where(mask, lse - target_logit, 0.0), mask


def mean_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Mean over real targets (0 when there are none)."""
    loss, mask = token_cross_entropy(logits_BxTxV, targets_BxT)
    return loss.sum() / jnp.maximum(mask.sum(), 1)
