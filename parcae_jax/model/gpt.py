"""The fixed-depth GPT baseline, built from the same blocks as Parcae (docs/design.md §8)."""

from __future__ import annotations

import flax.linen as nn
import numpy as np

from parcae_jax.model.config import ModelConfig
from parcae_jax.model.embedding import LMHead, TokenEmbed, ValueEmbeds, embed_ids
from parcae_jax.model.kv_slots import KVSlots
from parcae_jax.model.layers import RMSNorm, block_class, run_blocks
from parcae_jax.model.layout import block_specs
from parcae_jax.model.rope import Rope, ropes


class GPT(nn.Module):
    """Embedding -> n_layers blocks -> ln_f -> head. Takes Parcae's call signature and
    ignores `recurrence`, `initial_state` and `num_steps`. Returns float32 logits [B, T, V]
    (or, given `targets_BxT`, the per-token loss and mask as Parcae does).

    Segments (shared with generation, as Parcae's): `embed_tokens` and `run_body` (the
    blocks, the final norm and the head; it returns (output, kv), as Parcae's run_coda).

    Unlike the official GPT, whose eval path skips `logit_scale` and whose training
    head skips the softcap, both are applied here as configured (published configs use
    neither).
    """

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        block = block_class(cfg)
        self.embed = TokenEmbed(cfg)
        self.value_embeds = ValueEmbeds(cfg)
        self.block = [block(s, cfg) for s in block_specs(cfg)]  # block_0, ...
        self.ln_f = RMSNorm(cfg.norm_eps)
        self.lm_head = LMHead(cfg)

    def embed_tokens(self, ids_BxT):
        """(h [B, T, d], the embedding table, value embeddings by table)."""
        return embed_ids(self.embed, self.value_embeds, self.cfg, ids_BxT)

    def run_body(self, h_BxTxD, table, rope: Rope, ves: dict, segment_ids_BxT=None, targets_BxT=None,
                 kv: KVSlots | None = None, last_only: bool = False):
        """The blocks, final norm and head: (logits, or with targets loss and mask; kv): layer i
        in slot i. `last_only`: logits of the last position only ([B, 1, V]; a prefill's)."""
        specs = block_specs(self.cfg)
        h, kv, _ = run_blocks(self.block, specs, h_BxTxD, rope, ves, segment_ids_BxT, kv, range(len(specs)),
                              last_only)
        return self.lm_head(self.ln_f(h[:, -1:] if last_only else h), table, targets_BxT), kv

    def __call__(self, input_ids_BxT, recurrence=None, initial_state=None, num_steps=None, *,
                 segment_ids_BxT=None, positions=None, targets_BxT=None):
        del recurrence, initial_state, num_steps
        rope, _ = ropes(self.cfg, np.arange(input_ids_BxT.shape[1]) if positions is None else positions)
        h, table, ves = self.embed_tokens(input_ids_BxT)
        return self.run_body(h, table, rope, ves, segment_ids_BxT, targets_BxT)[0]
