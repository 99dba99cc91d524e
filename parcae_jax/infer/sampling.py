"""Choosing the next token from float32 logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from parcae_jax.infer import GenerationError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax; top_k and top_p then change nothing). top_k 0 and
    top_p 1.0 switch those filters off. Filters apply to the temperature-scaled logits, top-k
    first, as the official `generate` does."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # nan sampled token 0 throughout
            raise GenerationError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")


def filtered_logits(logits_BxV: jax.Array, s: Sampling) -> jax.Array:
    """The logits sampling draws from: scaled by 1/temperature, -inf outside top-k and top-p."""
    logits = logits_BxV.astype(jnp.float32) / s.temperature
    if 0 < s.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        p = jax.nn.softmax(sorted_logits, axis=-1)
        # A token is dropped when the tokens ranked above it already hold more than top_p:
        # the smallest prefix whose mass exceeds top_p survives (the top token always does).
        drop_sorted = (jnp.cumsum(p, axis=-1) - p) > s.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def next_token(logits_BxV: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """[B] int32: the next token of every row."""
    if s.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    # Row b draws from its own stream, so it samples the same whatever rows sit beside it.
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(logits_BxV.shape[0]))
    draw = jax.vmap(lambda k, logits_V: jax.random.categorical(k, logits_V))
    return draw(keys, filtered_logits(logits_BxV, s)).astype(jnp.int32)
