"""The key/value cache slots generation reads and writes: what one attention call sees of them
(CacheView), what one forward pass carries (KVSlots), and the mask over a slot (cache_mask).
model/attention.py reads and writes them; infer/ allocates them."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class CacheView(NamedTuple):
    """The key/value cache slot one attention call reads and writes (generation only).

    k, v: [B * G, S, D]: batch and kv heads merged, before positions. The attention products
    then read the slot as it is stored and written, one batch dimension and no size-1 one:
    any reshape of the written slot (a size-1 batch dimension dropped included) made XLA:CPU
    duplicate the in-place write and copy the whole slot twice per layer. The call writes its
    T new keys at positions start .. start + T - 1 and attends over the whole slot under
    `mask` [B, 1, 1, T, S] (cache_mask). `fresh`: the slot is empty and start is 0 (a prefill),
    so the new tokens read only one another and attention skips the masked blocks.
    `last_only`: every new token's key and value is written, but only the last token's output
    is computed ([B, 1, W]): a prefill's final block, whose other outputs nothing reads."""

    k: jax.Array
    v: jax.Array
    start: jax.Array | int
    mask: jax.Array
    fresh: bool = False
    last_only: bool = False


class KVSlots(NamedTuple):
    """The cache slots one forward pass reads and writes (generation only): the caller names
    each block's slot, and blocks run in order, so a layer that shares a slot with an earlier
    one reads that layer's write (several iterations may share a slot, infer/cache_slots)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    start: jax.Array | int
    mask: jax.Array
    fresh: bool = False  # see CacheView

    def view(self, slot: int, last_only: bool = False) -> CacheView:
        return CacheView(self.k[slot], self.v[slot], self.start, self.mask, self.fresh, last_only)

    def write(self, slot: int, kv: tuple[jax.Array, jax.Array]) -> KVSlots:
        put = lambda t, a: t[:slot] + (a,) + t[slot + 1:]  # noqa: E731
        return self._replace(k=put(self.k, kv[0]), v=put(self.v, kv[1]))


def cache_mask(start, T: int, S: int, pad_B: jax.Array) -> jax.Array:
    """[B, 1, 1, T, S]: query start + t reads keys up to itself and from its row's first real
    token on (rows are left-padded by pad_B). A padding query also reads itself, so that no
    softmax row is empty (an empty one gives NaN, and 0 * NaN would leak into real rows)."""
    s = jnp.arange(S)[None, None, :]
    q = (start + jnp.arange(T))[None, :, None]
    mask = (s <= q) & ((s >= pad_B[:, None, None]) | (s == q))
    return mask[:, None, None]
