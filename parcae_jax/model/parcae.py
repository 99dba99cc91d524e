"""Parcae: prelude -> (injection + core) looped -> C -> coda -> head (docs/design.md §2).

The forward is built from segments, methods that training (`__call__`) and generation
(infer/decode) both call, so the architecture is written once: `embed_tokens`,
`run_prelude`, `iterate` (one loop iteration, recurrence.CoreStep) and `run_coda` (C, the
coda, the final norm and the head). `run_prelude` and `run_coda` return (output, kv): given
`kv` (generation's cache slots) they read and write them, else kv stays None.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from parcae_jax.model import matmul
from parcae_jax.model.config import ModelConfig
from parcae_jax.model.embedding import LMHead, TokenEmbed, ValueEmbeds, embed_ids
from parcae_jax.model.init import matrix_init
from parcae_jax.model.kv_slots import KVSlots
from parcae_jax.model.layers import RMSNorm, block_class, run_blocks
from parcae_jax.model.layout import CODA, PRELUDE, segment_specs
from parcae_jax.model.recurrence import CoreStep, core_ves, recur
from parcae_jax.model.rope import Rope, ropes


class Parcae(nn.Module):
    """Call with exactly one way of choosing the depth:

    - `recurrence=R` (int or traced int32): evaluation, R iterations, no sampling; one
      compiled function serves every R;
    - `num_steps=(n, k)` (ints or [B] arrays): n iterations without and k with gradient,
      k <= mean_backprop_depth (the official `num_steps_pair`); training draws them with
      `recurrence.draw_loop_inputs`.

    x0 is `initial_state` ([B, T, d_rec]; zeros may be omitted with state_init='zero').
    The model draws nothing itself: the same inputs always give the same logits.
    Returns float32 logits [B, T, V], or with `targets_BxT` the per-token cross-entropy and
    its mask ([B, T] each; chunked by cfg.loss_chunk, see LMHead). Sows `prelude_out`, `state` (after the loop),
    `n_steps` and `k_steps` into the `intermediates` collection.
    """

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        block = block_class(cfg)
        self.embed = TokenEmbed(cfg)
        self.value_embeds = ValueEmbeds(cfg)
        self.prelude = [block(s, cfg) for s in segment_specs(cfg, PRELUDE)]  # prelude_0, ...
        self.ln_prelude = RMSNorm(cfg.norm_eps) if cfg.prelude_norm else None
        self.core = CoreStep(cfg)
        self.C = matmul.Dense(cfg.d_model, dtype=cfg.compute_dtype, kernel_init=nn.with_logical_partitioning(
            matrix_init(cfg.init_std, cfg.init_orthogonal), ("state", "embed")))
        self.coda = [block(s, cfg) for s in segment_specs(cfg, CODA)]  # coda_0, ...
        self.ln_f = RMSNorm(cfg.norm_eps)
        self.lm_head = LMHead(cfg)

    def embed_tokens(self, ids_BxT):
        """(h [B, T, d], the embedding table (a tied head's weight), value embeddings by table)."""
        return embed_ids(self.embed, self.value_embeds, self.cfg, ids_BxT)

    def run_prelude(self, h_BxTxD, rope: Rope, ves: dict, segment_ids_BxT=None, kv: KVSlots | None = None):
        """(e, the injected prelude output; kv): prelude layer i in main slot i."""
        specs = segment_specs(self.cfg, PRELUDE)
        h, kv, _ = run_blocks(self.prelude, specs, h_BxTxD, rope, ves, segment_ids_BxT, kv, range(len(specs)))
        return (self.ln_prelude(h) if self.ln_prelude is not None else h), kv

    def iterate(self, x_BxTxR, e_BxTxD, rope: Rope, ves: dict, segment_ids_BxT=None, kv: KVSlots | None = None,
                slots: tuple[int, ...] = ()):
        """One loop iteration (recurrence.CoreStep); `ves` as recurrence.core_ves gives them."""
        return self.core(x_BxTxR, e_BxTxD, rope, ves, segment_ids_BxT, kv, slots)

    def run_coda(self, x_BxTxR, table, rope: Rope, ves: dict, segment_ids_BxT=None, targets_BxT=None,
                 kv: KVSlots | None = None, last_only: bool = False):
        """C, the coda, the final norm and the head: (logits, or with targets loss and mask; kv):
        coda layer c in main slot n_prelude + c. `last_only`: logits of the last position only
        ([B, 1, V]; a prefill needs no others, and the head is 8% of a 1024-token prefill)."""
        specs = segment_specs(self.cfg, CODA)
        slots = range(self.cfg.n_prelude, self.cfg.n_prelude + len(specs))
        y, kv, _ = run_blocks(self.coda, specs, self.C(x_BxTxR), rope, ves, segment_ids_BxT, kv, slots, last_only)
        return self.lm_head(self.ln_f(y[:, -1:] if last_only else y), table, targets_BxT), kv

    def __call__(self, input_ids_BxT, recurrence=None, initial_state=None, num_steps=None, *,
                 segment_ids_BxT=None, positions=None, targets_BxT=None):
        cfg = self.cfg
        B, T = input_ids_BxT.shape
        rope_main, rope_core = ropes(cfg, np.arange(T) if positions is None else positions)
        h, table, ves = self.embed_tokens(input_ids_BxT)
        e, _ = self.run_prelude(h, rope_main, ves, segment_ids_BxT)
        self.sow("intermediates", "prelude_out", e)

        if initial_state is None:
            if not (cfg.state_init == "zero" or self.is_initializing()):
                raise ValueError(f"state_init={cfg.state_init!r} is random: pass initial_state=x0 [B, T, d_rec] "
                                 "(recurrence.draw_initial_state or draw_loop_inputs draws it)")
            initial_state = jnp.zeros((B, T, cfg.d_rec), jnp.float32)
        x = jnp.asarray(initial_state, jnp.float32)
        n_B, k_B, grad_steps = self._schedule(B, recurrence, num_steps)
        self.sow("intermediates", "n_steps", n_B)
        self.sow("intermediates", "k_steps", k_B)

        ves_core = core_ves(cfg, ves)
        if self.is_initializing():  # create the shared core weights before the lifted loops read them
            self.core(x, e, rope_core, ves_core, segment_ids_BxT)
        x = recur(self.core, x, e, rope_core, ves_core, segment_ids_BxT, n_B, k_B, grad_steps, cfg.loop_remat_policy,
                  cfg.unroll_grad_scan)
        self.sow("intermediates", "state", x)
        return self.run_coda(x, table, rope_main, ves, segment_ids_BxT, targets_BxT)[0]

    def _schedule(self, B: int, recurrence, num_steps):
        cfg = self.cfg
        if recurrence is not None and num_steps is not None:
            raise ValueError("pass either recurrence=R (evaluation) or num_steps=(n, k) (training), not both")
        if recurrence is not None:
            R = jnp.asarray(recurrence, jnp.int32)
            return jnp.broadcast_to(R, (B,)), jnp.zeros((B,), jnp.int32), 0
        if num_steps is not None:
            n, k = (jnp.broadcast_to(jnp.asarray(v, jnp.int32), (B,)) for v in num_steps)
            return n, k, cfg.mean_backprop_depth
        if self.is_initializing():
            return jnp.ones((B,), jnp.int32), jnp.zeros((B,), jnp.int32), 0
        raise ValueError("choose the depth: recurrence=R (evaluation) or num_steps=(n, k) (training; "
                         "recurrence.draw_loop_inputs draws them)")


def injection_params(params: dict) -> dict:
    """The injection's parameters in a Parcae parameter tree (for spectral_radius)."""
    return params["core"].get("injection", {})
