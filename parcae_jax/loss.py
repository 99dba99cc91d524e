"""Losses as pure functions of logits and targets (the per-token cross-entropy lives with
the model's head, which can also compute it chunk by chunk: model/xent.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from parcae_jax.model.xent import IGNORE, token_cross_entropy

__all__ = ["IGNORE", "mean_cross_entropy", "token_cross_entropy"]


def mean_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Mean over real targets (0 when there are none)."""
    loss, mask = token_cross_entropy(logits_BxTxV, targets_BxT)
    return loss.sum() / jnp.maximum(mask.sum(), 1)
