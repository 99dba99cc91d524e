"""The model's forward over a preallocated key/value cache: one function for the prompt
(prefill, T tokens) and for each new token (decode, T = 1).

It applies the model's own modules (Block, Injection, the embeddings and head) to their
parameter subtrees, in the order `Parcae.__call__` does, with one difference: each
attention reads and writes a cache slot (attention.CacheView). Slots:

- `main`, n_prelude + n_coda arrays [B * G, S, D]: prelude layer i in slot i, coda layer c
  in slot n_prelude + c (a GPT: layer i in slot i);
- `core`, n_core_slots arrays [B * Gr, S, Dr]: core layer j at iteration r in slot
  `slots[r, j]`, the official cache's key for that application under the chosen strategy
  (cache_slots.slot_table; several iterations may share a slot, the later write wins).

Every shape is static (B, S, the prompt's padded length, R), so decode compiles once and
runs for every token. The R iterations are unrolled, so every layer application knows its
slot at trace time: each slot is its own array, written in place and read by attention as
it is stored. (A loop over iterations would pick the slot out of a stacked array at run
time, copying the whole slot for every application: 1.5x the step time at 1024 positions.)

Rows are left-padded to a common prompt length: `pad_B` counts each row's padding, its RoPE
positions start at 0 on its first real token and no query reads a padding key, so a row
generates exactly what it would alone.

Adaptive exit (decode only): after each iteration a row whose state has settled stops
iterating (its state is frozen); once every row has stopped, the remaining iterations are
skipped (a conditional around each). The slots of the iterations a row skipped then hold,
at this position, the keys and values of the last iteration it ran, so later tokens read
them there. `depth_B` reports the iterations each
row ran. The prompt always runs all R iterations.
"""

from __future__ import annotations

import dataclasses
import math
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
        if not (math.isfinite(self.exit_threshold) and self.exit_threshold >= 0):  # nan would never exit, silently
            raise ValueError(f"exit threshold must be a finite number >= 0, got {self.exit_threshold}")

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
    main_k: tuple[jax.Array, ...]
    main_v: tuple[jax.Array, ...]
    core_k: tuple[jax.Array, ...]
    core_v: tuple[jax.Array, ...]
    length: jax.Array  # int32: positions written, where the next call starts
    pad_B: jax.Array  # int32 [B]: left padding of each row


def init_cache(plan: Plan, pad_B) -> Cache:
    """An empty cache for len(pad_B) rows, in the compute dtype."""
    cfg, B, S = plan.cfg, len(pad_B), plan.max_len
    dtype = jnp.dtype(cfg.compute_dtype)
    specs = block_specs(cfg)
    main = [s for s in specs if s.segment != "core"]
    zeros = lambda s, n: tuple(jnp.zeros((B * s.n_kv_heads, S, s.head_dim), dtype) for _ in range(n))  # noqa: E731
    core = [s for s in specs if s.segment == "core"]
    n_core_slots = 0 if plan.is_gpt else int(plan.core_slots().max()) + 1
    core_k = zeros(core[0], n_core_slots) if core else ()
    core_v = zeros(core[0], n_core_slots) if core else ()
    main_k = zeros(main[0], len(main)) if main else ()  # a Parcae may have no prelude and no coda
    main_v = zeros(main[0], len(main)) if main else ()
    return Cache(main_k, main_v, core_k, core_v, jnp.int32(0), jnp.asarray(pad_B, jnp.int32))


def _set(t: tuple, i: int, value) -> tuple:
    return t[:i] + (value,) + t[i + 1:]


def forward(plan: Plan, params: dict, ids_BxT: jax.Array, cache: Cache, x0_BxTxR: jax.Array | None = None,
            adaptive: bool = False):
    """Logits [B, T, V] (float32) of T new tokens at positions cache.length .., the cache with
    their keys and values written, and depth_B (iterations each row ran on its last token).

    x0_BxTxR: the initial recurrent state of these tokens (Parcae; recurrence.draw_initial_state).
    adaptive: apply the plan's exit rule (a decode step of one token: T must be 1).
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

    def block(s, p, x, ks, vs, slot, rope_s):  # the block, reading and writing cache slot `slot`
        x, (k, v) = Block(s, cfg).apply({"params": p}, x, rope_s, ve_of(s), None,
                                        CacheView(ks[slot], vs[slot], start, mask))
        return x, _set(ks, slot, k), _set(vs, slot, v)

    main_k, main_v = cache.main_k, cache.main_v
    if plan.is_gpt:
        for i, s in enumerate(specs):
            h, main_k, main_v = block(s, params[f"block_{i}"], h, main_k, main_v, i, rope)
        y = RMSNorm(cfg.norm_eps).apply({"params": params["ln_f"]}, h)
        logits = LMHead(cfg).apply({"params": params.get("lm_head", {})}, y, table)
        return logits, cache._replace(main_k=main_k, main_v=main_v, length=start + T), jnp.zeros((B,), jnp.int32)

    prelude = [s for s in specs if s.segment == "prelude"]
    core = [s for s in specs if s.segment == "core"]
    coda = [s for s in specs if s.segment == "coda"]
    for s in prelude:
        h, main_k, main_v = block(s, params[f"prelude_{s.index}"], h, main_k, main_v, s.index, rope)
    e = RMSNorm(cfg.norm_eps).apply({"params": params["ln_prelude"]}, h) if cfg.prelude_norm else h
    rope_core = rope if cfg.rec_head_dim == cfg.head_dim else rope_angles(
        positions, cfg.rec_head_dim, cfg.rope_base, cfg.rope_condense_ratio)

    def head(x, main_k, main_v):
        y = matmul.Dense(cfg.d_model, nn.initializers.zeros, cfg.compute_dtype).apply({"params": params["C"]}, x)
        for s in coda:
            y, main_k, main_v = block(s, params[f"coda_{s.index}"], y, main_k, main_v, len(prelude) + s.index, rope)
        y = RMSNorm(cfg.norm_eps).apply({"params": params["ln_f"]}, y)
        return LMHead(cfg).apply({"params": params.get("lm_head", {})}, y, table), main_k, main_v

    slots = plan.core_slots()

    def iteration(x, ck, cv, r: int):
        """One pass of the core; also each layer's key and value at this (single) position,
        taken before a later layer of the same pass can overwrite a shared slot."""
        u = Injection(cfg).apply({"params": params["core"]["injection"]}, x, e)
        written = []
        for j, s in enumerate(core):
            slot = int(slots[r, j])
            u, ck, cv = block(s, params["core"][f"block_{j}"], u, ck, cv, slot, rope_core)
            if adaptive:
                written.append((_at(ck[slot], start), _at(cv[slot], start)))
        return u, ck, cv, written

    x = (jnp.zeros((B, T, cfg.d_rec), jnp.float32) if x0_BxTxR is None else x0_BxTxR).astype(jnp.float32)
    ck, cv = cache.core_k, cache.core_v
    if adaptive and plan.exit_rule != "none":
        if T != 1:
            raise ValueError(f"adaptive exit decodes one token at a time, got {T}")
        x, ck, cv, depth_B = _adaptive(plan, iteration, lambda x: head(x, main_k, main_v)[0], x, ck, cv, slots, start)
    else:
        for r in range(plan.recurrence):
            x, ck, cv, _ = iteration(x, ck, cv, r)
        depth_B = jnp.full((B,), plan.recurrence, jnp.int32)
    logits, main_k, main_v = head(x, main_k, main_v)
    new = cache._replace(main_k=main_k, main_v=main_v, core_k=ck, core_v=cv, length=start + T)
    return logits, new, depth_B


def _settled(plan: Plan, x_new, x_old, logp_new, logp_old) -> jax.Array:
    """[B] bool: the row's state has stopped changing."""
    if plan.exit_rule == "delta":
        diff = jnp.sqrt(jnp.sum(jnp.square(x_new - x_old), axis=(1, 2)))
        measure = diff / (jnp.sqrt(jnp.sum(jnp.square(x_new), axis=(1, 2))) + 1e-12)
    else:
        # KL >= 0, but rounding can make it a hair negative: clamp so threshold 0 never fires
        measure = jnp.maximum(jnp.sum(jnp.exp(logp_new) * (logp_new - logp_old), axis=-1), 0.0)
    return measure < plan.exit_threshold


def _at(a, start):
    """[B * G, D]: a slot's entries at position `start`."""
    return jax.lax.dynamic_index_in_dim(a, start, axis=1, keepdims=False)


def _adaptive(plan: Plan, iteration, logits_of, x, ck, cv, slots: np.ndarray, start):
    """The iterations of one decode token with per-row exit (module docstring)."""
    B = x.shape[0]
    n_core, G = slots.shape[1], ck[0].shape[0] // B  # slot rows are (row, kv head) pairs
    kl = plan.exit_rule == "kl"
    at_start = lambda a: _at(a, start)  # noqa: E731  [B * G, D]
    logp_of = lambda x: jax.nn.log_softmax(logits_of(x)[:, -1]) if kl else jnp.zeros((B, 1))  # noqa: E731

    def run(r, c):
        active = c["active"]
        u, ck, cv, written = iteration(c["x"], c["k"], c["v"], r)
        x = jnp.where(active[:, None, None], u, c["x"])
        keep = lambda new, old: jnp.where(jnp.repeat(active, G)[:, None], new, old)  # noqa: E731
        lk = tuple(keep(k, c["lk"][j]) for j, (k, _) in enumerate(written))
        lv = tuple(keep(v, c["lv"][j]) for j, (_, v) in enumerate(written))
        logp = logp_of(x)
        settled = _settled(plan, x, c["x"], logp, c["logp"]) if r > 0 else jnp.zeros((B,), bool)
        return dict(x=x, k=ck, v=cv, active=active & ~settled, depth=c["depth"] + active.astype(jnp.int32),
                    logp=logp, lk=lk, lv=lv)

    empty = tuple(jnp.zeros((ck[0].shape[0], ck[0].shape[2]), ck[0].dtype) for _ in range(n_core))
    c = dict(x=x, k=ck, v=cv, active=jnp.ones((B,), bool), depth=jnp.zeros((B,), jnp.int32),
             logp=jnp.zeros((B, plan.cfg.padded_vocab_size if kl else 1)), lk=empty, lv=empty)
    for r in range(plan.recurrence):  # once every row has settled, the rest is skipped
        c = run(r, c) if r == 0 else jax.lax.cond(jnp.any(c["active"]), lambda c, r=r: run(r, c), lambda c: c, c)

    ck, cv = list(c["k"]), list(c["v"])
    for r in range(plan.recurrence):  # iterations a row skipped: its last keys and values, in order, later wins
        skipped = jnp.repeat(r >= c["depth"], G)[:, None]
        for j in range(n_core):
            s = int(slots[r, j])
            for arrs, last in ((ck, c["lk"][j]), (cv, c["lv"][j])):
                written = jnp.where(skipped, last, at_start(arrs[s]))[:, None]
                arrs[s] = jax.lax.dynamic_update_slice(arrs[s], written, (0, start, 0))
    return c["x"], tuple(ck), tuple(cv), c["depth"]
