"""The model's forward over a preallocated key/value cache: one function for the prompt
(prefill, T tokens) and for each new token (decode, T = 1).

It applies the model's own modules (Block, Injection, the embeddings and head) to their
parameter subtrees, in the order `Parcae.__call__` does, with one difference: each
attention reads and writes a cache slot (attention.CacheView). Slots:

- `main` [n_prelude + n_coda, B, S, G, D]: prelude layer i in slot i, coda layer c in slot
  n_prelude + c (a GPT: layer i in slot i);
- `core` [n_core_slots, B, S, Gr, Dr]: core layer j at iteration r in slot `slots[r, j]`,
  the official cache's key for that application under the chosen strategy
  (cache_slots.slot_table; several iterations may share a slot, the later write wins).

Every shape is static (B, S, the prompt's padded length, R), so decode compiles once and
runs for every token. Rows are left-padded to a common prompt length: `pad_B` counts each
row's padding, its RoPE positions start at 0 on its first real token and no query reads a
padding key, so a row generates exactly what it would alone.

Adaptive exit (decode only): after each iteration a row whose state has settled stops
iterating (its state is frozen); the loop ends when every row has stopped. The slots of the
iterations a row skipped then hold, at this position, the keys and values of the last
iteration it ran, so later tokens read them there. `depth_B` reports the iterations each
row ran. The prompt always runs all R iterations.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from parcae_jax.infer.cache_slots import check_strategy, slot_table
from parcae_jax.model import matmul
from parcae_jax.model.attention import CacheView, cache_mask, rope_angles
from parcae_jax.model.config import ModelConfig
from parcae_jax.model.embedding import LMHead, TokenEmbed, ValueEmbeds
from parcae_jax.model.injection import Injection
from parcae_jax.model.layers import Block, RMSNorm
from parcae_jax.model.layout import block_specs

EXIT_RULES = ("none", "delta", "kl")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one compiled generator is specialised on.

    recurrence: R, the iterations per token (ignored by GPT). strategy: the cache sharing
    rule (cache_slots). max_len: S, cache positions (prompt + new tokens). exit_rule:
    "none", "delta" (stop when |x_r - x_{r-1}| / |x_r| < exit_threshold) or "kl" (stop when
    KL(p_r || p_{r-1}) of the next-token distributions < exit_threshold, in nats).
    """

    cfg: ModelConfig
    recurrence: int = 1
    strategy: str = "full"
    max_len: int = 256
    exit_rule: str = "none"
    exit_threshold: float = 0.0

    def __post_init__(self):
        check_strategy(self.strategy)
        if self.exit_rule not in EXIT_RULES:
            raise ValueError(f"exit rule {self.exit_rule!r} is unknown; use one of {', '.join(EXIT_RULES)}")
        if self.recurrence < 1:
            raise ValueError(f"recurrence must be >= 1, got {self.recurrence}")

    @property
    def is_gpt(self) -> bool:
        return self.cfg.arch == "gpt"

    def core_slots(self) -> np.ndarray:
        """[R, n_core] int32: the core slot of each (iteration, layer), numbered 0.. by first use."""
        c = self.cfg
        table = slot_table(c.n_prelude, c.n_core, c.n_coda, self.recurrence, self.strategy)
        core = np.asarray(table[c.n_prelude:c.n_prelude + self.recurrence * c.n_core])
        return np.unique(core, return_inverse=True)[1].reshape(self.recurrence, c.n_core).astype(np.int32)


class Cache(NamedTuple):
    main_k: jax.Array
    main_v: jax.Array
    core_k: jax.Array
    core_v: jax.Array
    length: jax.Array  # int32: positions written, where the next call starts
    pad_B: jax.Array  # int32 [B]: left padding of each row


def init_cache(plan: Plan, pad_B) -> Cache:
    """An empty cache for len(pad_B) rows, in the compute dtype."""
    cfg, B, S = plan.cfg, len(pad_B), plan.max_len
    dtype = jnp.dtype(cfg.compute_dtype)
    specs = block_specs(cfg)
    main = [s for s in specs if s.segment != "core"]
    main_shape = (len(main), B, S, main[0].n_kv_heads, main[0].head_dim)
    if plan.is_gpt:
        core_shape = (0, B, S, 1, 1)
    else:
        core = next(s for s in specs if s.segment == "core")
        core_shape = (int(plan.core_slots().max()) + 1, B, S, core.n_kv_heads, core.head_dim)
    zeros = lambda shape: jnp.zeros(shape, dtype)  # noqa: E731
    return Cache(zeros(main_shape), zeros(main_shape), zeros(core_shape), zeros(core_shape),
                 jnp.int32(0), jnp.asarray(pad_B, jnp.int32))


def forward(plan: Plan, params: dict, ids_BxT: jax.Array, cache: Cache, x0_BxTxR: jax.Array | None = None):
    """Logits [B, T, V] (float32) of T new tokens at positions cache.length .., the cache with
    their keys and values written, and depth_B (iterations each row ran on its last token).

    x0_BxTxR: the initial recurrent state of these tokens (Parcae; recurrence.draw_initial_state).
    """
    cfg = plan.cfg
    B, T = ids_BxT.shape
    start, S = cache.length, plan.max_len
    mask = cache_mask(start, T, S, cache.pad_B)
    positions = start + jnp.arange(T)[None, :] - cache.pad_B[:, None]
    rope = rope_angles(positions, cfg.head_dim, cfg.rope_base, cfg.rope_condense_ratio)
    specs = block_specs(cfg)
    h, table = TokenEmbed(cfg).apply({"params": params["embed"]}, ids_BxT)
    tables = tuple(s.table for s in specs if s.applies_ve)
    ves = ValueEmbeds(cfg).apply({"params": params.get("value_embeds", {})}, ids_BxT, tables) if tables else {}
    ve_of = lambda s: ves[s.table] if s.applies_ve else None  # noqa: E731
    main_k, main_v = cache.main_k, cache.main_v

    def block(s, p, x, k, v, slot, rope_s):
        return Block(s, cfg).apply({"params": p}, x, rope_s, ve_of(s), None, CacheView(k, v, slot, start, mask))

    if plan.is_gpt:
        for i, s in enumerate(specs):
            h, (main_k, main_v) = block(s, params[f"block_{i}"], h, main_k, main_v, i, rope)
        y = RMSNorm(cfg.norm_eps).apply({"params": params["ln_f"]}, h)
        logits = LMHead(cfg).apply({"params": params.get("lm_head", {})}, y, table)
        return logits, cache._replace(main_k=main_k, main_v=main_v, length=start + T), jnp.zeros((B,), jnp.int32)

    prelude = [s for s in specs if s.segment == "prelude"]
    core = [s for s in specs if s.segment == "core"]
    coda = [s for s in specs if s.segment == "coda"]
    for s in prelude:
        h, (main_k, main_v) = block(s, params[f"prelude_{s.index}"], h, main_k, main_v, s.index, rope)
    e = RMSNorm(cfg.norm_eps).apply({"params": params["ln_prelude"]}, h) if cfg.prelude_norm else h
    rope_core = rope if cfg.rec_head_dim == cfg.head_dim else rope_angles(
        positions, cfg.rec_head_dim, cfg.rope_base, cfg.rope_condense_ratio)

    def head(x, main_k, main_v):
        y = matmul.Dense(cfg.d_model, nn.initializers.zeros, cfg.compute_dtype).apply({"params": params["C"]}, x)
        for s in coda:
            y, (main_k, main_v) = block(s, params[f"coda_{s.index}"], y, main_k, main_v, len(prelude) + s.index, rope)
        y = RMSNorm(cfg.norm_eps).apply({"params": params["ln_f"]}, y)
        return LMHead(cfg).apply({"params": params.get("lm_head", {})}, y, table), main_k, main_v

    slots = jnp.asarray(plan.core_slots())
    adaptive = plan.exit_rule != "none" and T == 1

    def iteration(x, core_k, core_v, r):
        u = Injection(cfg).apply({"params": params["core"]["injection"]}, x, e)
        for j, s in enumerate(core):
            u, (core_k, core_v) = block(s, params["core"][f"block_{j}"], u, core_k, core_v, slots[r, j], rope_core)
        return u, core_k, core_v

    x = (jnp.zeros((B, T, cfg.d_rec), jnp.float32) if x0_BxTxR is None else x0_BxTxR).astype(jnp.float32)
    if not adaptive:
        def body(r, c):
            return iteration(*c, r)
        x, core_k, core_v = jax.lax.fori_loop(0, plan.recurrence, body, (x, cache.core_k, cache.core_v))
        depth_B = jnp.full((B,), plan.recurrence, jnp.int32)
    else:
        x, core_k, core_v, depth_B = _adaptive_loop(plan, iteration, head, x, cache, main_k, main_v, slots, start)
    logits, main_k, main_v = head(x, main_k, main_v)
    new = cache._replace(main_k=main_k, main_v=main_v, core_k=core_k, core_v=core_v, length=start + T)
    return logits, new, depth_B


def _settled(plan: Plan, x_new, x_old, logp_new, logp_old, r) -> jax.Array:
    """[B] bool: the row's state has stopped changing after iteration r (never after the first)."""
    if plan.exit_rule == "delta":
        diff = jnp.sqrt(jnp.sum(jnp.square(x_new - x_old), axis=(1, 2)))
        measure = diff / (jnp.sqrt(jnp.sum(jnp.square(x_new), axis=(1, 2))) + 1e-12)
    else:
        measure = jnp.sum(jnp.exp(logp_new) * (logp_new - logp_old), axis=-1)
    return (r > 0) & (measure < plan.exit_threshold)


def _adaptive_loop(plan: Plan, iteration, head, x, cache: Cache, main_k, main_v, slots, start):
    """The loop of one decode token with per-row exit (module docstring)."""
    B = x.shape[0]
    n_core = slots.shape[1]
    kl = plan.exit_rule == "kl"
    V = plan.cfg.padded_vocab_size

    def at_start(c, slot):  # [B, G, D]: the keys this token wrote in `slot`
        return jax.lax.dynamic_index_in_dim(c, slot, 0, keepdims=False)[:, start] if jnp.ndim(slot) == 0 else \
            c[slot, jnp.arange(B), start]

    def cond(c):
        return (c["r"] < plan.recurrence) & jnp.any(c["active"])

    def body(c):
        r, active = c["r"], c["active"]
        u, ck, cv = iteration(c["x"], c["k"], c["v"], r)
        x = jnp.where(active[:, None, None], u, c["x"])
        logp = jax.nn.log_softmax(head(x, main_k, main_v)[0][:, -1]) if kl else c["logp"]
        lk = tuple(jnp.where(active[:, None, None], at_start(ck, slots[r, j]), c["lk"][j]) for j in range(n_core))
        lv = tuple(jnp.where(active[:, None, None], at_start(cv, slots[r, j]), c["lv"][j]) for j in range(n_core))
        depth = c["depth"] + active.astype(jnp.int32)
        still = active & ~_settled(plan, x, c["x"], logp, c["logp"], r)
        return dict(x=x, k=ck, v=cv, r=r + 1, active=still, depth=depth, logp=logp, lk=lk, lv=lv)

    empty = tuple(jnp.zeros((B,) + cache.core_k.shape[3:], cache.core_k.dtype) for _ in range(n_core))
    c = jax.lax.while_loop(cond, body, dict(
        x=x, k=cache.core_k, v=cache.core_v, r=jnp.int32(0), active=jnp.ones((B,), bool),
        depth=jnp.zeros((B,), jnp.int32), logp=jnp.zeros((B, V) if kl else (B, 1), jnp.float32), lk=empty, lv=empty))

    def fill(r, kv):  # iterations a row skipped: its last keys and values, in order, later wins
        ck, cv = kv
        skipped = (r >= c["depth"])[:, None, None]
        for j in range(n_core):
            s = slots[r, j]
            ck = ck.at[s, :, start].set(jnp.where(skipped, c["lk"][j], at_start(ck, s)))
            cv = cv.at[s, :, start].set(jnp.where(skipped, c["lv"][j], at_start(cv, s)))
        return ck, cv

    ck, cv = jax.lax.fori_loop(0, plan.recurrence, fill, (c["k"], c["v"]))
    return c["x"], ck, cv, c["depth"]
