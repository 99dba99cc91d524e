"""Token embedding, value-embedding tables and the output head (tied or not)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from parcae_jax.model import matmul, xent
from parcae_jax.model.config import ModelConfig
from parcae_jax.model.init import matrix_init
from parcae_jax.model.layout import block_specs, table_widths


class TokenEmbed(nn.Module):
    """wte: [V, d] scaled-orthogonal; also the head's weight when tied."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(matrix_init(cfg.init_std, cfg.init_orthogonal), ("vocab", "embed")),
            (cfg.padded_vocab_size, cfg.d_model), jnp.float32)

    def __call__(self, ids_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns the embeddings and the table (for a tied head)."""
        h = jnp.take(self.embedding, ids_BxT, axis=0)
        if self.cfg.emb_scale != 1.0:
            h = h * self.cfg.emb_scale
        return nn.with_logical_constraint(h, ("batch", "length", "embed")), self.embedding


class ValueEmbeds(nn.Module):
    """Tables `value_embeds/{k}` ([V, kv width], N(0, 1)); returns the lookups by table key."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, ids_BxT: jax.Array, keys: tuple[str, ...]) -> dict[str, jax.Array]:
        V = self.cfg.padded_vocab_size
        tables = {k: self.param(k, nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "kv")),
                                (V, w), jnp.float32)
                  for k, w in table_widths(self.cfg).items()}
        # Laid out like activations (batch over data and fsdp): the lookup would otherwise keep
        # the table's kv-over-fsdp layout and the partitioner gather the whole batch to fit it.
        return {k: nn.with_logical_constraint(jnp.take(tables[k], ids_BxT, axis=0), ("batch", "length", "kv"))
                for k in keys}


class LMHead(nn.Module):
    """float32 logits = (y @ W) * logit_scale, then the optional softcap cap * tanh(z / cap).

    With `targets_BxT` it returns the per-token cross-entropy and its mask instead (xent.py):
    the head's matmul and the loss under one custom VJP (xent.head_cross_entropy), or with
    `cfg.loss_chunk` > 0 computed that many positions at a time, so that the [B, T, V] logits
    are never held whole.

    A tied head contracts with the [V, d] table directly rather than with its transpose:
    the table's gradient then comes out of the dot as [V, d]. With a transpose in between,
    XLA:CPU folds it into a bf16 x bf16 -> f32 dot layout its runtime cannot execute.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, y_BxTxD: jax.Array, embedding_VxD: jax.Array, targets_BxT: jax.Array | None = None):
        cfg = self.cfg
        if cfg.tie_embeddings:
            spec, kernel = "btd,vd->btv", embedding_VxD
        else:
            spec, kernel = "btd,dv->btv", self.param(
                "kernel",
                nn.with_logical_partitioning(matrix_init(cfg.init_std, cfg.init_orthogonal), ("embed", "vocab")),
                (cfg.d_model, cfg.padded_vocab_size), jnp.float32)

        def logits_fn(y):
            return xent.head_logits(matmul.einsum(spec, y, kernel, cfg.compute_dtype), cfg.logit_scale,
                                    cfg.logit_softcap)[0]

        if targets_BxT is None:
            return logits_fn(y_BxTxD)
        if 0 < cfg.loss_chunk < y_BxTxD.shape[1]:
            return xent.chunked_token_cross_entropy(y_BxTxD, logits_fn, targets_BxT, cfg.loss_chunk)
        return xent.head_cross_entropy(y_BxTxD, kernel, spec, targets_BxT, cfg.compute_dtype, cfg.logit_scale,
                                       cfg.logit_softcap, cfg.loss_impl)


def embed_ids(embed: TokenEmbed, value_embeds: ValueEmbeds, cfg: ModelConfig, ids_BxT):
    """(h [B, T, d], the embedding table, value embeddings by table) for Parcae and GPT alike."""
    h, table = embed(ids_BxT)
    return h, table, value_embeds(ids_BxT, tuple(s.table for s in block_specs(cfg) if s.applies_ve))
