"""RMSNorm, the ReLU^2 MLP, and the pre-norm transformer block shared by Parcae and GPT."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from parcae_jax.model import matmul
from parcae_jax.model.attention import Attention
from parcae_jax.model.config import ModelConfig
from parcae_jax.model.init import matrix_init
from parcae_jax.model.kv_slots import CacheView, KVSlots
from parcae_jax.model.layout import BlockSpec
from parcae_jax.model.remat import checkpoint_policy
from parcae_jax.model.rope import Rope

RESIDUAL_AXES = ("batch", "length", "embed")


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back, times a learnt scale (init 1)."""

    eps: float
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        return (y * scale).astype(x.dtype)


def relu2(x: jax.Array) -> jax.Array:
    """The official ReLU2 carries a factor 0.5: 0.5 * relu(x)^2."""
    return 0.5 * jnp.square(jax.nn.relu(x))


def relu2_times_8(x: jax.Array) -> jax.Array:
    """(x + |x|)^2 = 8 * relu2(x), with no constant in it: XLA:CPU passes a constant into its
    matmul fusions as a full-size broadcast array, so 0.5 and relu's 0 became two [B * T, d_mlp]
    float32 arrays read by every MLP. Exact (a power of two scales without rounding) for
    1e-19 < |x| < 2^63 in float32 and bfloat16, not in float16; NaN and -inf differ."""
    return jnp.square(x + jnp.abs(x))


def constant_free_mlp(cfg: ModelConfig, prefill: bool) -> bool:
    """Whether the MLP computes relu2_times_8 and a proj kernel / 8 (the same numbers) instead
    of relu2 (docs/design.md §10): on XLA:CPU only, where it was measured (Intel AMX), for a
    generation prefill (8 x 1024: 12% less time in float32, 24% in bfloat16) and bfloat16
    training (~3%). Not in float32 training (15-18% slower: XLA recomputes the activation's
    gradient inside the transposed copy its weight gradient reads), nor a one-token float32
    decode step (scaling the kernel is a copy as large as the step's read of it), nor float16."""
    dtype = jnp.dtype(cfg.compute_dtype)
    if jax.default_backend() != "cpu" or dtype == jnp.float16:
        return False
    return prefill or dtype == jnp.bfloat16


class MLP(nn.Module):
    width: int
    d_mlp: int
    cfg: ModelConfig
    constant_free: bool = False  # relu2_times_8 and proj / 8: constant_free_mlp says where

    @nn.compact
    def __call__(self, x_BxTxW: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.cfg.compute_dtype)
        std = math.sqrt(2.0 / (5.0 * self.width))
        h = matmul.Dense(self.d_mlp, dtype=dtype, name="fc",
                     kernel_init=nn.with_logical_partitioning(matrix_init(std, self.cfg.init_orthogonal),
                                                              ("embed", "mlp")))(x_BxTxW)
        # constant-free: the activation also in a loop of its own, between two matmul fusions
        h = matmul.own_precision(relu2_times_8(h)) if self.constant_free else relu2(h)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return matmul.Dense(self.width, dtype=dtype, name="proj", kernel_scale=0.125 if self.constant_free else 1.0,
                        kernel_init=nn.with_logical_partitioning(matrix_init(0.0, self.cfg.init_orthogonal),
                                                                 ("mlp", "embed")))(h)


class Block(nn.Module):
    """x + Attn(norm_1(x)), then x + MLP(norm_2(x)). Output projections start at zero,
    so every block is the identity map at initialisation."""

    spec: BlockSpec
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxW, rope: Rope, ve_BxTxK=None, segment_ids_BxT=None, cache: CacheView | None = None):
        """The new residual stream; with a `cache` (generation), (stream, updated (k, v) slots)."""
        eps = self.cfg.norm_eps
        x_BxTxW = nn.with_logical_constraint(x_BxTxW, RESIDUAL_AXES)
        a = Attention(self.spec, self.cfg, name="attn")(RMSNorm(eps, name="norm_1")(x_BxTxW), rope, ve_BxTxK,
                                                         segment_ids_BxT, cache)
        a, kv = a if cache is not None else (a, None)
        if cache is not None and cache.last_only:  # the last token's stream only, from here on
            x_BxTxW = x_BxTxW[:, -1:]
        x_BxTxW = x_BxTxW + a
        free = constant_free_mlp(self.cfg, prefill=cache is not None and x_BxTxW.shape[1] > 1)
        mlp = MLP(self.spec.width, self.spec.d_mlp, self.cfg, free, name="mlp")
        x_BxTxW = x_BxTxW + mlp(RMSNorm(eps, name="norm_2")(x_BxTxW))
        x_BxTxW = nn.with_logical_constraint(x_BxTxW, RESIDUAL_AXES)
        return x_BxTxW if cache is None else (x_BxTxW, kv)


def block_class(cfg: ModelConfig) -> type[Block]:
    """Block, rematerialised under cfg.block_remat's policy unless that is "none": the
    backward pass then recomputes what the policy did not save, in exchange for not holding
    each block's activations. Parameter names are unchanged (a checkpoint restores either way)."""
    policy = checkpoint_policy(cfg.block_remat)
    return Block if policy is None else nn.remat(Block, policy=policy)


def run_blocks(blocks, specs, h_BxTxW, rope: Rope, ves: dict, segment_ids_BxT=None,
               kv: KVSlots | None = None, slots=(), last_only: bool = False):
    """(h through `blocks` in order, kv, the (k, v) each block wrote). Block i reads value
    embedding ves[specs[i].table] where it applies; with `kv` (generation) it reads and writes
    slot slots[i] (without, kv stays None and nothing is written). `last_only` (with `kv`): the
    last block writes every token's keys and values but returns the last token's stream only,
    [B, 1, W] (what a prefill's head reads: ~7% less work for a 12-block 1024-token prefill)."""
    written = []
    for i, (blk, s) in enumerate(zip(blocks, specs)):
        ve = ves[s.table] if s.applies_ve else None
        if kv is None:
            h_BxTxW = blk(h_BxTxW, rope, ve, segment_ids_BxT)
        else:
            h_BxTxW, new = blk(h_BxTxW, rope, ve, None, kv.view(slots[i], last_only and i == len(specs) - 1))
            kv = kv.write(slots[i], new)
            written.append(new)
    return h_BxTxW, kv, tuple(written)
