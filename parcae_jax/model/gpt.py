"""The fixed-depth GPT baseline, built from the same blocks as Parcae (docs/design.md §8)."""

from __future__ import annotations

import flax.linen as nn
import numpy as np

from parcae_jax.model.attention import rope_angles
from parcae_jax.model.config import ModelConfig
from parcae_jax.model.embedding import LMHead, TokenEmbed, ValueEmbeds
from parcae_jax.model.layers import RMSNorm, block_class
from parcae_jax.model.layout import block_specs


class GPT(nn.Module):
    """Embedding -> n_layers blocks -> ln_f -> head. Takes Parcae's call signature and
    ignores `recurrence`, `initial_state` and `num_steps`. Returns float32 logits [B, T, V]
    (or, given `targets_BxT`, the per-token loss and mask as Parcae does).

    Unlike the official GPT, whose eval path skips `logit_scale` and whose training
    head skips the softcap, both are applied here as configured (published configs use
    neither).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids_BxT, recurrence=None, initial_state=None, num_steps=None, *,
                 segment_ids_BxT=None, positions=None, targets_BxT=None):
        del recurrence, initial_state, num_steps
        cfg = self.cfg
        T = input_ids_BxT.shape[1]
        specs = block_specs(cfg)
        block = block_class(cfg)
        positions = np.arange(T) if positions is None else positions
        rope = rope_angles(positions, cfg.head_dim, cfg.rope_base, cfg.rope_condense_ratio)
        h, table = TokenEmbed(cfg, name="embed")(input_ids_BxT)
        ves = ValueEmbeds(cfg, name="value_embeds")(input_ids_BxT, tuple(s.table for s in specs if s.applies_ve))
        for s in specs:
            h = block(s, cfg, name=f"block_{s.index}")(h, rope, ves[s.table] if s.applies_ve else None, segment_ids_BxT)
        h = RMSNorm(cfg.norm_eps, name="ln_f")(h)
        return LMHead(cfg, name="lm_head")(h, table, targets_BxT)
