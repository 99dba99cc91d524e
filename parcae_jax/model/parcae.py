"""Parcae: prelude -> (injection + core) looped -> C -> coda -> head (docs/design.md §2)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from parcae_jax.model import matmul
from parcae_jax.model.attention import rope_angles
from parcae_jax.model.config import ModelConfig
from parcae_jax.model.embedding import LMHead, TokenEmbed, ValueEmbeds
from parcae_jax.model.init import matrix_init
from parcae_jax.model.layers import RMSNorm, block_class
from parcae_jax.model.layout import block_specs
from parcae_jax.model.recurrence import CoreStep, recur


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

    @nn.compact
    def __call__(self, input_ids_BxT, recurrence=None, initial_state=None, num_steps=None, *,
                 segment_ids_BxT=None, positions=None, targets_BxT=None):
        cfg = self.cfg
        B, T = input_ids_BxT.shape
        specs = block_specs(cfg)
        block = block_class(cfg)
        positions = np.arange(T) if positions is None else positions
        rope_main = rope_angles(positions, cfg.head_dim, cfg.rope_base, cfg.rope_condense_ratio)
        rope_core = rope_main if cfg.rec_head_dim == cfg.head_dim else rope_angles(
            positions, cfg.rec_head_dim, cfg.rope_base, cfg.rope_condense_ratio)

        h, table = TokenEmbed(cfg, name="embed")(input_ids_BxT)
        ves = ValueEmbeds(cfg, name="value_embeds")(input_ids_BxT, tuple(s.table for s in specs if s.applies_ve))
        ve_of = lambda s: ves[s.table] if s.applies_ve else None  # noqa: E731

        for s in (s for s in specs if s.segment == "prelude"):
            h = block(s, cfg, name=f"prelude_{s.index}")(h, rope_main, ve_of(s), segment_ids_BxT)
        e = RMSNorm(cfg.norm_eps, name="ln_prelude")(h) if cfg.prelude_norm else h
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

        core = CoreStep(cfg, name="core")
        core_ves = tuple(ve_of(s) for s in specs if s.segment == "core")
        if self.is_initializing():  # create the shared core weights before the lifted loops read them
            core(x, e, rope_core, core_ves, segment_ids_BxT)
        x = recur(core, x, e, rope_core, core_ves, segment_ids_BxT, n_B, k_B, grad_steps, cfg.remat_policy)
        self.sow("intermediates", "state", x)

        y = matmul.Dense(cfg.d_model, dtype=cfg.compute_dtype, name="C",
                  kernel_init=nn.with_logical_partitioning(matrix_init(cfg.init_std, cfg.init_orthogonal),
                                                           ("state", "embed")))(x)
        for s in (s for s in specs if s.segment == "coda"):
            y = block(s, cfg, name=f"coda_{s.index}")(y, rope_main, ve_of(s), segment_ids_BxT)
        y = RMSNorm(cfg.norm_eps, name="ln_f")(y)
        return LMHead(cfg, name="lm_head")(y, table, targets_BxT)

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

