"""optim.update_impl="cpu": the fused AdamW kernel against the XLA path (step.guarded_update
with make_optimizer's adamw chain) and against NumPy in float64, its guard, and where it runs.
No model is compiled: the update takes small trees whose leaves end off the 16-lane vectors
and span several of the kernel's chunks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae_jax.model.config import ConfigError
from parcae_jax.model.cpu_kernels import library
from parcae_jax.training import defaults, fused_adamw
from parcae_jax.training.optim import make_optimizer, schedule_values
from parcae_jax.training.step import guarded_update
from parcae_jax.training.train import Trainer
from parcae_jax.training.validate import validate

LIB = library.load()
needs_kernel = pytest.mark.skipif(isinstance(LIB, str), reason=f"the fused CPU kernels are unavailable: {LIB}")
SHAPES = {"a": (3, 5), "b": (17,), "c": (1,), "d": (2, 16384 + 3), "e": (64, 64)}


def adamw(**kw):
    optim = defaults.get_config().optim
    optim.update({**dict(name="adamw", lr=1e-2, b1=0.8, b2=0.95, eps=1e-10), **kw})
    return optim


def trees(seed=0, steps_taken=3):
    """params, token-summed grads, and an adamw state after `steps_taken` updates."""
    rng = np.random.default_rng(seed)

    def tree(scale, positive=False):
        out = {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()}
        return {k: np.abs(v) if positive else v for k, v in out.items()}

    params, grads = tree(1.0), tree(50.0)
    tx, _ = make_optimizer(adamw())
    adam, *rest = tx.init(params)
    adam = adam._replace(count=jnp.int32(steps_taken), mu=tree(1e-2), nu=tree(1e-4, positive=True))
    return params, grads, (adam, *rest)


def both(optim, params, grads, opt_state, *, denom=64.0, clip=0.5, ok=True, step=5):
    """(XLA path, kernel) results of one update, each jitted."""
    tx, lrs = make_optimizer(optim)
    schedule = schedule_values(optim, 100)
    kw = dict(step=jnp.int32(step), schedule=schedule, denom=jnp.float32(denom), clip=jnp.float32(clip),
              ok=jnp.bool_(ok))
    xla = jax.jit(functools.partial(guarded_update, tx, **kw))(params, grads, opt_state)
    kernel = jax.jit(functools.partial(fused_adamw.make_update(optim, lrs["lr"]), **kw))(params, grads, opt_state)
    return jax.device_get(xla), jax.device_get(kernel)


@needs_kernel
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_kernel_update_equals_the_xla_path_and_numpy(weight_decay):
    optim = adamw(weight_decay=weight_decay)
    params, grads, opt_state = trees()
    (xp, xs, xok), (kp, ks, kok) = both(optim, params, grads, opt_state)
    assert bool(xok) and bool(kok) and int(ks[0].count) == int(xs[0].count) == 4
    # a few units in the last place of the terms apart (XLA:CPU multiplies by reciprocals of
    # denom and the bias corrections, and contracts other sums)
    close = functools.partial(np.testing.assert_allclose, rtol=2e-6)
    jax.tree.map(functools.partial(close, atol=1e-8), (kp, ks[0].mu), (xp, xs[0].mu))
    jax.tree.map(functools.partial(close, atol=1e-9), ks[0].nu, xs[0].nu)
    # and the formula in float64 (adamw.cc's header), to float32's precision
    lr = float(make_optimizer(optim)[1]["lr"](jnp.int32(5), schedule_values(optim, 100)))
    b1, b2, eps, t = optim.b1, optim.b2, optim.eps, 4
    for k in SHAPES:
        g = grads[k].astype(np.float64) / 64.0 * 0.5
        m = (1 - b1) * g + b1 * opt_state[0].mu[k].astype(np.float64)
        v = (1 - b2) * g * g + b2 * opt_state[0].nu[k].astype(np.float64)
        u = m / (1 - b1 ** t) / (np.sqrt(v / (1 - b2 ** t)) + eps) + weight_decay * params[k]
        np.testing.assert_allclose(ks[0].mu[k], m, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(ks[0].nu[k], v, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(kp[k], params[k] - lr * u, rtol=1e-6, atol=1e-7)


@needs_kernel
@pytest.mark.parametrize("case", ["flag off", "parameters overflow", "a moment is NaN"])
def test_a_non_finite_update_changes_nothing(case):
    optim = adamw(lr=3e38) if case == "parameters overflow" else adamw()
    params, grads, opt_state = trees()
    if case == "a moment is NaN":
        opt_state[0].nu["d"][1, 16384 + 2] = np.nan  # the last element of a leaf's last chunk
    (xp, xs, xok), (kp, ks, kok) = both(optim, params, grads, opt_state, ok=case != "flag off")
    assert not bool(xok) and not bool(kok) and int(ks[0].count) == 3
    jax.tree.map(np.testing.assert_array_equal, (kp, ks), (params, tuple(jax.device_get(opt_state))))


@needs_kernel
def test_the_state_is_updated_in_place():
    """Donated, the update writes into the buffers it was given: no copy of a leaf anywhere in
    the compiled program (the XLA path's conditional copies every one back)."""
    optim = adamw()
    params, grads, opt_state = trees()
    tx, lrs = make_optimizer(optim)
    kw = dict(step=jnp.int32(5), schedule=schedule_values(optim, 100), denom=jnp.float32(64), clip=jnp.float32(1),
              ok=jnp.bool_(True))

    def leaf_copies(update):
        text = jax.jit(functools.partial(update, **kw), donate_argnums=(0, 2)).lower(
            params, grads, opt_state).compile().as_text()
        return sum(" copy(" in line and "f32[" in line.split("copy(")[0] for line in text.splitlines())

    assert leaf_copies(functools.partial(guarded_update, tx)) >= 3 * len(SHAPES)
    assert leaf_copies(fused_adamw.make_update(optim, lrs["lr"])) == 0


def test_where_the_kernel_runs_and_why_not():
    assert "runs AdamW only" in fused_adamw.unavailable(defaults.get_config().optim, 1)
    assert "runs on one device (the mesh has 8)" == fused_adamw.unavailable(adamw(), 8)
    assert "CPU backend only (this is gpu)" in fused_adamw.unavailable(adamw(), 1, backend="gpu")
    assert fused_adamw.uses_kernel(adamw(update_impl="xla"), 1) is False
    assert fused_adamw.uses_kernel(adamw(update_impl="auto"), 8) is False
    with pytest.raises(ConfigError) as e:
        fused_adamw.uses_kernel(adamw(update_impl="cpu", name="muon_adamw"), 1)
    assert "\n" not in str(e.value) and "optim.update_impl='cpu'" in str(e.value) and "update_impl=auto" in str(e.value)
    assert fused_adamw.uses_kernel(adamw(), 1) is not isinstance(LIB, str)
    config = defaults.get_config()  # muon_adamw: refused by validate, before anything compiles
    config.optim.update_impl = "cpu"
    with pytest.raises(ConfigError, match="runs AdamW only"):
        validate(config, n_devices=1, check_data=False)


@needs_kernel
def test_a_train_step_through_the_kernel_equals_the_xla_step():
    """The whole step (micro-batched: the gradient is summed before the update) with update_impl
    auto and xla: the same loss and parameters, to the update's last bits. A one-layer GPT: the
    update sees only the parameter tree, and this is the cheapest model to compile. Both run
    the head's loss kernel (loss_impl="cpu") too, under the trainer's one-device mesh."""
    from tests.test_train import batch, small_config

    steps = {}
    for impl in ("auto", "xla"):
        config = small_config(microbatches=2, batch_size=2)  # 1-row micro-batches: a short compile
        config.optim.update(name="adamw", weight_decay=0.1, update_impl=impl)
        config.model.update(arch="gpt", n_layers=1, loss_impl="cpu")  # GPT compiles fastest
        trainer = Trainer(config, validate(config, n_devices=1, check_data=False), jax.devices()[:1])
        with trainer.context():
            state, rows = trainer.fresh_state(), batch(trainer, B=2)
            lowered = trainer.train_step.lower(state, rows, trainer.schedule).as_text()
            assert ("parcae_adamw" in lowered) == (impl == "auto") and "parcae_head_xent" in lowered
            state, metrics = trainer.train_step(state, rows, trainer.schedule)
            steps[impl] = jax.device_get((state.params, state.opt_state, metrics["loss"], metrics["skipped"]))
    (kp, ks, kl, kskip), (xp, xs, xl, xskip) = steps["auto"], steps["xla"]
    assert kl == xl and not kskip and not xskip and int(ks[0].count) == int(xs[0].count) == 1
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-6, atol=1e-8), (kp, ks), (xp, xs))
