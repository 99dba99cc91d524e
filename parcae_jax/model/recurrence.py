"""The loop: depth sampling, the initial state, and the recurrent core run T times.

One training forward runs, per sequence b, n_b iterations without gradient followed by
k_b iterations with gradient (truncated BPTT). The batch pays for max(n) + max(k)
iterations; row b takes an update only while its own counter runs (docs/design.md
§5). The no-gradient phase is a `while_loop` over stop-gradient parameters and
inputs, so it keeps no activations and one compiled function serves every count; the
gradient phase is a rematerialised `scan` of static length `mean_backprop_depth`.
Rows that have finished their no-gradient iterations drop out of the work in buckets
(see `_nograd_compacted`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from parcae_jax.model.config import ModelConfig
from parcae_jax.model.injection import Injection
from parcae_jax.model.kv_slots import KVSlots
from parcae_jax.model.layers import Block, run_blocks
from parcae_jax.model.layout import CORE, segment_specs
from parcae_jax.model.remat import checkpoint_policy
from parcae_jax.model.rope import Rope


def sample_depths(key: jax.Array, batch_size: int, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(n_B, k_B): iterations without and with gradient for every sequence, int32.

    poisson-truncated-full: total = max(Poisson(mean_recurrence), 1), k = min(total,
    mean_backprop_depth), n = total - k. fixed: n = max(mean_recurrence - s, 0), k = s.
    per-batch draws once and shares the draw (unlike the official per-batch mode,
    which runs n + k iterations, the total here is the Poisson draw itself).
    """
    s = cfg.mean_backprop_depth
    t = max(cfg.mean_recurrence - s, 0)
    shape = (batch_size,) if cfg.sampling_unit == "per-sequence" else ()
    if cfg.sampling_scheme == "fixed":
        n, k = jnp.full(shape, t, jnp.int32), jnp.full(shape, s, jnp.int32)
    else:
        total = jnp.maximum(jax.random.poisson(key, float(t + s), shape, dtype=jnp.int32), 1)
        k = jnp.minimum(total, s)
        n = total - k
    return jnp.broadcast_to(n, (batch_size,)), jnp.broadcast_to(k, (batch_size,))


def draw_initial_state(key: jax.Array | None, shape: tuple[int, ...], cfg: ModelConfig) -> jax.Array:
    """x0 as the official `state_init` options; like-init uses the main width d, not r."""
    if cfg.state_init == "zero":
        return jnp.zeros(shape, jnp.float32)
    if key is None:
        raise ValueError(f"state_init={cfg.state_init!r} is random: draw x0 with a key")
    if cfg.state_init == "like-init":
        std = math.sqrt(2.0 / (5.0 * cfg.d_model))
        return std * cfg.emb_scale * jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)
    z = jax.random.normal(key, shape, jnp.float32)
    if cfg.state_init == "embed":
        return z / math.sqrt(cfg.d_model)
    if cfg.state_init == "unit":  # torch.std is the unbiased estimate
        return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-8)
    return z  # normal


EVALUATION_STREAM = 2**31 - 1  # fold_in(key(seed), this): the evaluation states, apart from training's draws


def evaluation_state(cfg: ModelConfig, seed: int, length: int) -> jax.Array:
    """x0 [1, length, d_rec] for scoring and generation: position t's state is drawn from the
    seed's evaluation stream folded with t, the same for every row, batch and window length.

    Every door that scores a checkpoint uses it (training's evaluations and --mode=eval,
    test_time, the lm-eval adapter, generation), so the same weights and seed give the same
    loss through each: a prefix of a longer draw equals a shorter draw, and no row's states
    depend on the rows batched with it."""
    key = jax.random.fold_in(jax.random.key(seed), EVALUATION_STREAM)
    per_position = jax.vmap(lambda t: draw_initial_state(jax.random.fold_in(key, t), (cfg.d_rec,), cfg))
    return per_position(jnp.arange(length))[None]


def draw_loop_inputs(key: jax.Array, batch_size: int, seq_len: int, cfg: ModelConfig) -> dict[str, jax.Array]:
    """The random inputs of one training forward, from one key: `n`, `k` ([B] int32, see
    sample_depths) and `x0` ([B, T, d_rec], see draw_initial_state).

    The model never draws these itself: the caller passes `num_steps=(n, k)` and
    `initial_state=x0`, so a (seed, step) key fixes them for the whole global batch, whatever
    the mesh or the micro-batching.
    """
    n, k = sample_depths(jax.random.fold_in(key, 0), batch_size, cfg)
    x0 = draw_initial_state(jax.random.fold_in(key, 1), (batch_size, seq_len, cfg.d_rec), cfg)
    # Sharded like the batch: with partitionable threefry each device then draws only its own
    # rows, instead of every device drawing (and holding) the whole global batch's x0.
    return {"n": n, "k": k, "x0": nn.with_logical_constraint(x0, ("batch", "length", "embed"))}


class CoreStep(nn.Module):
    """One loop iteration: injection, then the core blocks (one shared set of weights).

    ves: the value embeddings by table (see ValueEmbeds). With `kv` (generation) core layer j
    reads and writes slot slots[j]; the call then returns (state, kv, the (k, v) each layer
    wrote), else the state."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxR, e_BxTxD, rope: Rope, ves: dict, segment_ids_BxT=None,
                 kv: KVSlots | None = None, slots: tuple[int, ...] = ()):
        u = Injection(self.cfg, name="injection")(x_BxTxR, e_BxTxD)
        specs = segment_specs(self.cfg, CORE)
        blocks = [Block(spec, self.cfg, name=f"block_{j}") for j, spec in enumerate(specs)]
        u, kv, written = run_blocks(blocks, specs, u, rope, ves, segment_ids_BxT, kv, slots)
        return u if kv is None else (u, kv, written)


def core_ves(cfg: ModelConfig, ves: dict) -> dict:
    """The value embeddings the core reads, of all of them by table (the loop carries no others)."""
    return {s.table: ves[s.table] for s in segment_specs(cfg, CORE) if s.applies_ve}


def _stop_gradient_tree(tree):
    return jax.tree.map(jax.lax.stop_gradient, tree)


def _masked(active_B: jax.Array, new, old):
    return jnp.where(active_B[:, None, None], new, old)


def batch_shards() -> int:
    """How many data-parallel shards the batch has under the current mesh and rules (1 if none)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.shape:
        return 1
    spec = nn.logical_to_mesh_axes(("batch",))[0]
    axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
    return math.prod(dict(mesh.shape).get(a, 1) for a in axes)


def _nograd_compacted(core, x, e, rope, ves, seg, n_B, groups: int):
    """The no-gradient phase, each iteration on as few rows as hold every active one.

    Rows are sorted by n (within each data-parallel shard, so no row changes device), and
    iteration i runs the core on the first m rows of every shard, m the smallest of b,
    3b/4, b/2, 3b/8, b/4, b/8 (b = B/g) that still covers each row with n > i. Rows are
    independent (attention stays within a row) and inactive rows keep their state, so the
    result is the same as running every row. At mean recurrence 4, batch 8, this phase
    costs 17.8 row-iterations per step on average instead of 40.4 (all rows every time);
    every row's own count would be 16.9. Each size is one more compiled copy of the core.
    """
    B = x.shape[0]
    groups = groups if B % groups == 0 else 1  # e.g. a batch of 1 at initialisation
    b = B // groups
    sizes = sorted({m for m in (b, 3 * b // 4, b // 2, 3 * b // 8, b // 4, b // 8) if m >= 1}, reverse=True)
    order = jnp.argsort(-n_B.reshape(groups, b), axis=1, stable=True)
    take = lambda a: None if a is None else _within_shards(a, order)  # noqa: E731
    e, seg, n = take(e), take(seg), take(n_B)
    ves = {t: take(v) for t, v in ves.items()}
    n_max = jnp.max(n)

    def rows(a, m):  # the first m rows of every shard
        return None if a is None else a.reshape(groups, b, *a.shape[1:])[:, :m].reshape(groups * m, *a.shape[1:])

    def branch(m):
        def run(mdl, x, i):
            y = mdl(rows(x, m), rows(e, m), rope, {t: rows(v, m) for t, v in ves.items()}, rows(seg, m))
            y = _masked(i < rows(n, m), y, rows(x, m))
            return x.reshape(groups, b, *x.shape[1:]).at[:, :m].set(y.reshape(groups, m, *x.shape[1:])).reshape(x.shape)
        return run

    def body(mdl, carry):
        x, i = carry
        active = jnp.max(jnp.sum((n > i).reshape(groups, b), axis=1))
        which = sum((active <= m).astype(jnp.int32) for m in sizes[1:])  # index of the smallest size >= active
        return nn.switch(which, [branch(m) for m in sizes], mdl, x, i), i + 1

    def loop(mdl, x):
        return nn.while_loop(lambda _, c: c[1] < n_max, body, mdl, (x, jnp.int32(0)),
                             broadcast_variables="params", split_rngs={"params": False})[0]

    x = nn.map_variables(loop, "params", trans_in_fn=_stop_gradient_tree, mutable=False)(core, take(x))
    return _within_shards(x, jnp.argsort(order, axis=1))


def _within_shards(a: jax.Array, order_Gxb: jax.Array) -> jax.Array:
    """a [B, ...] with the rows of each of the G shards (b = B/G rows each) reordered by that
    shard's row of `order_Gxb`. A gather batched over the shard axis: the partitioner keeps
    every shard on its device, where `a[global permutation]` would all-gather the whole batch
    onto every device (the global batch's activations on each chip of a pod)."""
    G, b = order_Gxb.shape
    index = order_Gxb.reshape(G, b, *([1] * (a.ndim - 1)))
    return jnp.take_along_axis(a.reshape(G, b, *a.shape[1:]), index, axis=1).reshape(a.shape)


def recur(core: CoreStep, x_BxTxR, e_BxTxD, rope: Rope, ves: dict, segment_ids_BxT,
          n_B: jax.Array, k_B: jax.Array, grad_steps: int, remat_policy: str, unroll: bool = False) -> jax.Array:
    """Runs n_B no-gradient then k_B gradient iterations per row (k_B <= grad_steps); `unroll`
    writes the gradient iterations' scan out in full (model.scan_unroll)."""
    sg = _stop_gradient_tree
    groups = batch_shards()
    x = sg(_nograd_compacted(core, sg(x_BxTxR), sg(e_BxTxD), rope, sg(ves), segment_ids_BxT, n_B, groups))
    if grad_steps == 0:
        return x

    def grad_body(mdl, carry, _):
        x, i = carry
        return (_masked(i < k_B, mdl(x, e_BxTxD, rope, ves, segment_ids_BxT), x), i + 1), None

    policy = checkpoint_policy(remat_policy)
    if policy is not None:
        # A rolled scan keeps XLA from merging the recomputation with the forward; written out,
        # only the remat's barriers do (else every policy would quietly become "none").
        grad_body = nn.remat(grad_body, prevent_cse=unroll, policy=policy)
    scan = nn.scan(grad_body, variable_broadcast="params", split_rngs={"params": False}, length=grad_steps,
                   unroll=grad_steps if unroll else 1)
    (x, _), _ = scan(core, (x, jnp.int32(0)), None)
    return x
