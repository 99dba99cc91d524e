"""The pure training and evaluation steps (jit them; train.py does, with shardings).

Randomness is a function of (seed, step): depths and x0 are drawn once for the whole
global batch from fold_in(key(seed), step), so a resumed run, a run on another mesh and
a run cut into micro-batches all see the same depths for the same sequences.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from parcae_jax.model import init_params
from parcae_jax.model.config import ModelConfig
from parcae_jax.model.injection import spectral_radius
from parcae_jax.model.parcae import injection_params
from parcae_jax.model.recurrence import draw_loop_inputs, evaluation_state
from parcae_jax.runtime.checkpoint import all_finite


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes, and everything a checkpoint holds: a pytree whose
    shardings train.py declares once (parameters and optimizer moments by logical axes)."""

    step: jax.Array  # optimizer steps taken (skipped ones included), int32
    params: Any
    opt_state: Any
    skipped: jax.Array  # steps whose gradient was not finite, int32


def init_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """Step 0: fresh parameters (`model.init_params`, unboxed) and optimizer state."""
    params = nn.unbox(init_params(model, key))
    return TrainState(jnp.int32(0), params, tx.init(params), jnp.int32(0))


def guarded_update(tx, params, grads, opt_state, *, step, schedule, denom, clip, ok) -> tuple[Any, Any, jax.Array]:
    """`tx`'s update of `grads / denom * clip`, applied: (params, opt_state, True); or, when the
    flag `ok` is off (a non-finite loss or gradient) or a new parameter or moment is not finite
    (an lr of 1e6, an overflow in the optimizer), the ones passed in and False."""
    grads = jax.tree.map(lambda g: g / denom * clip, grads)
    updates, new_state = tx.update(grads, opt_state, params, step=step, schedule=schedule)
    new_params = optax.apply_updates(params, updates)
    ok = ok & all_finite((new_params, new_state))
    # One branch on the flag, not a select per leaf: XLA would fuse the flag's whole chain of
    # per-leaf checks into every leaf's select (leaves x leaves instructions, about half of a
    # small model's compile).
    new_params, new_state = jax.lax.cond(ok, lambda: (new_params, new_state), lambda: (params, opt_state))
    return new_params, new_state, ok


def make_train_step(model: nn.Module, tx, lrs: dict[str, Callable], *, seed: int, microbatches: int = 1,
                    clip_norm: float = 1.0, document_masking: bool = False,
                    fused_update: Callable | None = None) -> Callable:
    """The pure step `(TrainState, batch, schedule) -> (TrainState, metrics)` for `jax.jit`.

    `batch` holds `inputs`, `targets` ([B, T] int32; a target < 0 is not a token) and
    `segment_ids`. The depths and x0 come from fold_in(key(seed), state.step) for the whole
    global batch; `microbatches` > 1 accumulates token-summed losses and gradients with a
    `scan`, so the update equals the one-batch update. The gradient is clipped to
    `clip_norm` (0: off). A step whose loss, gradient, new parameters or optimizer state are
    not finite changes nothing but `step` and `skipped`. `lrs` names schedules logged per step.
    `schedule`: optim.schedule_values, arguments rather than constants (one executable serves
    runs that differ only in learning rate or length). `fused_update` (fused_adamw.make_update)
    takes `guarded_update`'s place: the same update and guard in one CPU kernel.
    """
    cfg: ModelConfig = model.cfg

    def loss_sum(params, mb):
        extra = {"num_steps": (mb["n"], mb["k"]), "initial_state": mb["x0"]} if cfg.arch == "parcae" else {}
        (loss, mask), inter = model.apply({"params": params}, mb["inputs"], mutable=["intermediates"],
                                          segment_ids_BxT=mb["segment_ids"] if document_masking else None,
                                          targets_BxT=mb["targets"], **extra)
        state = inter.get("intermediates", {}).get("state")  # GPT sows nothing
        state_norm = jnp.mean(jnp.linalg.norm(state[0], axis=-1)) if state else jnp.float32(0)
        return loss.sum(), (mask.sum(), state_norm)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def train_step(state: TrainState, batch: dict, schedule: dict) -> tuple[TrainState, dict]:
        B, T = batch["inputs"].shape
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        data = {**batch, **(draw_loop_inputs(key, B, T, cfg) if cfg.arch == "parcae" else {})}
        if microbatches == 1:
            (total, (count, norm)), grads = grad_fn(state.params, data)
        else:  # accumulate token-summed losses and gradients over micro-batches
            split = jax.tree.map(lambda x: x.reshape(microbatches, B // microbatches, *x.shape[1:]), data)

            def body(acc, mb):
                (summed, (c, s)), g = grad_fn(state.params, mb)
                return jax.tree.map(jnp.add, acc, (summed, c, s, g)), None

            zeros = (jnp.float32(0), jnp.int32(0), jnp.float32(0), jax.tree.map(jnp.zeros_like, state.params))
            (total, count, norm, grads), _ = jax.lax.scan(body, zeros, split)
            norm = norm / microbatches
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        loss = total / denom
        grad_norm = optax.global_norm(jax.tree.map(lambda g: g / denom, grads))
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
        # as torch's clip_grad_norm_: scale by max_norm / (norm + 1e-6) when above it
        clip = jnp.minimum(1.0, clip_norm / (grad_norm + 1e-6)) if clip_norm > 0 else jnp.float32(1)
        update = fused_update or functools.partial(guarded_update, tx)
        params, opt_state, finite = update(state.params, grads, state.opt_state, step=state.step, schedule=schedule,
                                           denom=denom, clip=clip, ok=finite)
        new = TrainState(state.step + 1, params, opt_state, state.skipped + (~finite).astype(jnp.int32))
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "skipped": ~finite,
                   **{name: lr(state.step, schedule) for name, lr in lrs.items()}}
        if cfg.arch == "parcae":
            inj = injection_params(state.params)
            metrics.update(rho=spectral_radius(inj, cfg.injection), state_norm=norm,
                           depth_mean=jnp.mean(data["n"] + data["k"]).astype(jnp.float32),
                           depth_max_nograd=jnp.max(data["n"]), depth_max_grad=jnp.max(data["k"]))
        return new, metrics

    return train_step


def make_eval_step(model: nn.Module, *, seed: int, document_masking: bool = False) -> Callable:
    """(params, batch, R) -> (loss sum, real tokens); R is traced: one compile for every R.
    x0 is recurrence.evaluation_state: every evaluation of the same weights gives the same loss,
    and so do recurrence_curve and the lm-eval adapter."""
    cfg: ModelConfig = model.cfg

    def eval_step(params, batch: dict, recurrence) -> tuple[jax.Array, jax.Array]:
        B, T = batch["inputs"].shape
        extra = {}
        if cfg.arch == "parcae":
            x0 = jnp.broadcast_to(evaluation_state(cfg, seed, T), (B, T, cfg.d_rec))
            extra = {"recurrence": recurrence, "initial_state": x0}
        loss, mask = model.apply({"params": params}, batch["inputs"], targets_BxT=batch["targets"],
                                 segment_ids_BxT=batch["segment_ids"] if document_masking else None, **extra)
        return loss.sum(), mask.sum()

    return eval_step
