"""Cross-entropy of the head's logits against next-token targets: all positions at once, or
a chunk of positions at a time so that the [B, T, V] logits never exist in full."""

from __future__ import annotations

from typing import Callable

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


def chunked_token_cross_entropy(y_BxTxD: jax.Array, logits_fn: Callable[[jax.Array], jax.Array],
                                targets_BxT: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """token_cross_entropy(logits_fn(y), targets), `chunk` positions at a time.

    A `scan` over chunks of the length axis (the batch axis keeps its sharding); each chunk's
    body is rematerialised, so the forward keeps only per-token losses and the backward
    recomputes one chunk's logits at a time: peak logits memory is B x chunk x V instead of
    B x T x V (twice that with the gradient). A length that `chunk` does not divide is padded
    with ignored targets. The head's weight gradient is summed over chunks in float32.
    """
    B, T, D = y_BxTxD.shape
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        y_BxTxD = jnp.pad(y_BxTxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)), constant_values=IGNORE)
    y_NxBxCxD = y_BxTxD.reshape(B, n, chunk, D).transpose(1, 0, 2, 3)
    t_NxBxC = targets_BxT.reshape(B, n, chunk).transpose(1, 0, 2)

    @jax.checkpoint
    def one(y_BxCxD, t_BxC):
        return token_cross_entropy(logits_fn(y_BxCxD), t_BxC)

    _, (loss_NxBxC, mask_NxBxC) = jax.lax.scan(lambda c, xs: (c, one(*xs)), None, (y_NxBxCxD, t_NxBxC))
    unchunk = lambda a: a.transpose(1, 0, 2).reshape(B, n * chunk)[:, :T]  # noqa: E731
    return unchunk(loss_NxBxC), unchunk(mask_NxBxC)


def mean_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Mean over real targets (0 when there are none)."""
    loss, mask = token_cross_entropy(logits_BxTxV, targets_BxT)
    return loss.sum() / jnp.maximum(mask.sum(), 1)
