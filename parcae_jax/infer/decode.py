"""The model's forward over a preallocated key/value cache: one function for the prompt
(prefill, T tokens) and for each new token (decode, T = 1).

It calls the model's own segments (model/parcae.py: embed_tokens, run_prelude, iterate,
run_coda; GPT's run_body), as `Parcae.__call__` does, with one difference: each attention
reads and writes a cache slot (kv_slots.KVSlots). The loop is ours, because generation
unrolls it. Slots:

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

import jax
import jax.numpy as jnp
import numpy as np

from parcae_jax.infer import GenerationError
from parcae_jax.infer.cache_slots import check_strategy, slot_table
from parcae_jax.model import build
from parcae_jax.model.config import ModelConfig
from parcae_jax.model.kv_slots import KVSlots, cache_mask
from parcae_jax.model.layout import CORE, block_specs, segment_specs
from parcae_jax.model.recurrence import core_ves
from parcae_jax.model.rope import ropes

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
            raise GenerationError(f"exit rule {self.exit_rule!r} is unknown; use one of {', '.join(EXIT_RULES)}")
        if self.recurrence < 1:
            raise GenerationError(f"recurrence must be >= 1, got {self.recurrence}")
        if not (math.isfinite(self.exit_threshold) and self.exit_threshold >= 0):  # nan would never exit, silently
            raise GenerationError(f"exit threshold must be a finite number >= 0, got {self.exit_threshold}")

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
    """One array per slot, [B * G, S, D]. Keys are stored after RoPE and qk-norm with their
    channels in `rope.pairs_to_halves` order, not the official interleaved order."""

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
    core = segment_specs(cfg, CORE)
    main = [s for s in block_specs(cfg) if s not in core]
    zeros = lambda s, n: tuple(jnp.zeros((B * s.n_kv_heads, S, s.head_dim), dtype) for _ in range(n))  # noqa: E731
    n_core_slots = 0 if plan.is_gpt else int(plan.core_slots().max()) + 1
    core_k = zeros(core[0], n_core_slots) if core else ()
    core_v = zeros(core[0], n_core_slots) if core else ()
    main_k = zeros(main[0], len(main)) if main else ()  # a Parcae may have no prelude and no coda
    main_v = zeros(main[0], len(main)) if main else ()
    return Cache(main_k, main_v, core_k, core_v, jnp.int32(0), jnp.asarray(pad_B, jnp.int32))


def forward(plan: Plan, params: dict, ids_BxT: jax.Array, cache: Cache, x0_BxTxR: jax.Array | None = None,
            adaptive: bool = False, fresh: bool = False, last_only: bool = False):
    """Logits [B, T, V] (float32; [B, 1, V] with last_only) of T new tokens at positions
    cache.length .., the cache with their keys and values written, and depth_B (iterations
    each row ran on its last token).

    x0_BxTxR: the initial recurrent state of these tokens (Parcae; generator.initial_states draws them).
    adaptive: apply the plan's exit rule (a decode step of one token: T must be 1).
    fresh: `cache` is init_cache's, empty (a prefill): attention then reads only the T new
    tokens, skipping masked blocks, instead of every slot position.
    last_only: the logits of the last position only (what a prefill samples from).

    Every piece is one of the model's own segments, applied to the whole parameter tree (a
    separate `apply` each, so that adaptive exit can put iterations under `lax.cond`).
    """
    cfg = plan.cfg
    model = build(cfg)
    segment = lambda method, *args: model.apply({"params": params}, *args, method=method)  # noqa: E731
    B, T = ids_BxT.shape
    start, S = cache.length, plan.max_len
    mask = cache_mask(start, T, S, cache.pad_B)
    rope, rope_core = ropes(cfg, start + jnp.arange(T)[None, :] - cache.pad_B[:, None], table_len=S)
    main = KVSlots(cache.main_k, cache.main_v, start, mask, fresh)
    h, table, ves = segment("embed_tokens", ids_BxT)

    if plan.is_gpt:
        logits, main = segment("run_body", h, table, rope, ves, None, None, main, last_only)
        return logits, cache._replace(main_k=main.k, main_v=main.v, length=start + T), jnp.zeros((B,), jnp.int32)

    e, main = segment("run_prelude", h, rope, ves, None, main)
    ves_core = core_ves(cfg, ves)
    slots = plan.core_slots()

    def iteration(x, core: KVSlots, r: int):
        """One pass of the core: (state, slots, the (k, v) each layer wrote)."""
        return segment("iterate", x, e, rope_core, ves_core, None, core, tuple(int(i) for i in slots[r]))

    def head(x, main: KVSlots):
        return segment("run_coda", x, table, rope, ves, None, None, main, last_only)

    x = (jnp.zeros((B, T, cfg.d_rec), jnp.float32) if x0_BxTxR is None else x0_BxTxR).astype(jnp.float32)
    core = KVSlots(cache.core_k, cache.core_v, start, mask, fresh)
    if adaptive and plan.exit_rule != "none":
        if T != 1:
            raise AssertionError(f"adaptive exit decodes one token at a time, got {T}")
        x, core, depth_B = _adaptive(plan, iteration, lambda x: head(x, main)[0], x, core, slots, start)
    else:
        for r in range(plan.recurrence):
            x, core, _ = iteration(x, core, r)
        depth_B = jnp.full((B,), plan.recurrence, jnp.int32)
    logits, main = head(x, main)
    new = cache._replace(main_k=main.k, main_v=main.v, core_k=core.k, core_v=core.v, length=start + T)
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


def _adaptive(plan: Plan, iteration, logits_of, x, core: KVSlots, slots: np.ndarray, start):
    """The iterations of one decode token with per-row exit (module docstring)."""
    B = x.shape[0]
    n_core, G = slots.shape[1], core.k[0].shape[0] // B  # slot rows are (row, kv head) pairs
    kl = plan.exit_rule == "kl"
    logp_of = lambda x: jax.nn.log_softmax(logits_of(x)[:, -1]) if kl else jnp.zeros((B, 1))  # noqa: E731

    def run(r, c):
        active = c["active"]
        # each layer's key and value at this (single) position, read from what that layer wrote,
        # before a later layer of the same pass can overwrite a shared slot
        u, kv, written = iteration(c["x"], core._replace(k=c["keys"], v=c["values"]), r)
        x = jnp.where(active[:, None, None], u, c["x"])
        keep = lambda new, old: jnp.where(jnp.repeat(active, G)[:, None], new, old)  # noqa: E731
        lk = tuple(keep(_at(k, start), c["lk"][j]) for j, (k, _) in enumerate(written))
        lv = tuple(keep(_at(v, start), c["lv"][j]) for j, (_, v) in enumerate(written))
        logp = logp_of(x)
        settled = _settled(plan, x, c["x"], logp, c["logp"]) if r > 0 else jnp.zeros((B,), bool)
        return dict(x=x, keys=kv.k, values=kv.v, active=active & ~settled, depth=c["depth"] + active.astype(jnp.int32),
                    logp=logp, lk=lk, lv=lv)

    ck = core.k
    empty = tuple(jnp.zeros((ck[0].shape[0], ck[0].shape[2]), ck[0].dtype) for _ in range(n_core))
    c = dict(x=x, keys=core.k, values=core.v, active=jnp.ones((B,), bool), depth=jnp.zeros((B,), jnp.int32),
             logp=jnp.zeros((B, plan.cfg.padded_vocab_size if kl else 1)), lk=empty, lv=empty)
    for r in range(plan.recurrence):  # once every row has settled, the rest is skipped
        c = run(r, c) if r == 0 else jax.lax.cond(jnp.any(c["active"]), lambda c, r=r: run(r, c), lambda c: c, c)

    ck, cv = list(c["keys"]), list(c["values"])
    for r in range(plan.recurrence):  # iterations a row skipped: its last keys and values, in order, later wins
        skipped = jnp.repeat(r >= c["depth"], G)[:, None]
        for j in range(n_core):
            s = int(slots[r, j])
            for arrs, last in ((ck, c["lk"][j]), (cv, c["lv"][j])):
                written = jnp.where(skipped, last, _at(arrs[s], start))[:, None]
                arrs[s] = jax.lax.dynamic_update_slice(arrs[s], written, (0, start, 0))
    return c["x"], core._replace(k=tuple(ck), v=tuple(cv)), c["depth"]
