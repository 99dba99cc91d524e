"""The loop against independent computations: a plain Python loop, rows run alone, memory."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae_jax.interop.convert import load_reference
from parcae_jax.model import build, init_params
from parcae_jax.model.recurrence import CoreStep, draw_initial_state, draw_loop_inputs, sample_depths
from parcae_jax.model.rope import rope_angles
from parcae_jax.model.xent import mean_cross_entropy, token_cross_entropy
from tests.conftest import FIXTURES
from tests.helpers import eqn_params, shifted_labels, tiny


@pytest.fixture(scope="module")
def ref():
    """The fixture model: its output projections are perturbed, so no block is the identity."""
    cfg, params = load_reference(str(FIXTURES / "reference_parcae_tiny"))
    ids = np.load(FIXTURES / "reference_parcae_tiny" / "input_ids.npy")
    x0 = np.load(FIXTURES / "reference_parcae_tiny" / "state_init.npy")
    return cfg, build(cfg), params, ids, x0


def python_loop_state(cfg, model, params, ids, x0, R):
    """R applications of injection + core blocks in a Python for-loop, outside any scan."""
    _, inter = model.apply({"params": params}, ids, recurrence=1, initial_state=x0, mutable=["intermediates"])
    e = inter["intermediates"]["prelude_out"][0]
    rope = rope_angles(jnp.arange(ids.shape[1]), cfg.rec_head_dim, cfg.rope_base, cfg.rope_condense_ratio)
    ves = {"1": params["value_embeds"]["1"][ids]}  # core block 0 applies table 1, block 1 none
    step = CoreStep(cfg)
    x = x0
    for _ in range(R):
        x = step.apply({"params": params["core"]}, x, e, rope, ves)
    return np.asarray(x)


@pytest.mark.slow
@pytest.mark.parametrize("n,k", [(0, 1), (3, 2), (5, 0)])
def test_scanned_loop_equals_python_loop(ref, n, k):
    cfg, model, params, ids, x0 = ref
    expected = python_loop_state(cfg, model, params, ids, x0, n + k)
    for kwargs in ({"recurrence": n + k}, {"num_steps": (n, k)}):
        _, inter = model.apply({"params": params}, ids, initial_state=x0, mutable=["intermediates"], **kwargs)
        np.testing.assert_allclose(inter["intermediates"]["state"][0], expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_per_sequence_masking_equals_each_row_alone(ref):
    cfg, model, params, _, _ = ref
    B = 3
    ids = np.random.default_rng(0).integers(0, 256, (B, 32))
    x0 = np.asarray(draw_initial_state(jax.random.key(3), (B, 32, cfg.d_rec), cfg))
    labels = shifted_labels(ids)
    n, k = np.array([0, 3, 1]), np.array([2, 1, 2])

    @jax.jit  # n and k are traced: one compile for the batch, one for single rows
    def summed_row_losses(p, ids, x0, labels, n, k):
        logits = model.apply({"params": p}, ids, num_steps=(n, k), initial_state=x0)
        loss, mask = token_cross_entropy(logits, labels)
        return jnp.sum(loss.sum(1) / mask.sum(1)), logits

    summed_row_losses = jax.jit(jax.value_and_grad(summed_row_losses, has_aux=True))
    (_, logits), grads = summed_row_losses(params, ids, x0, labels, n, k)
    row_grads = []
    for b in range(B):
        one = lambda a, b=b: a[b:b + 1]  # noqa: E731
        (_, row_logits), g = summed_row_losses(params, one(ids), one(x0), one(labels), n[b], k[b])
        np.testing.assert_allclose(logits[b:b + 1], row_logits, atol=1e-5, rtol=0)
        row_grads.append(g)
    summed = jax.tree.map(lambda *g: sum(g), *row_grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), grads, summed)


def _grad_temp_bytes(cfg, n, k):
    model = build(cfg)
    params = nn.unbox(init_params(model, jax.random.key(0)))
    ids = jnp.zeros((2, 64), jnp.int32)
    x0 = jnp.zeros((2, 64, cfg.d_rec))
    loss = lambda p: mean_cross_entropy(model.apply({"params": p}, ids, num_steps=(n, k), initial_state=x0), ids)  # noqa: E731
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_no_gradient_steps_keep_no_activations():
    # The scan rolled: what the no-gradient loop keeps does not depend on it, and the control's
    # 18 gradient iterations would otherwise compile 18 copies of the iteration.
    cfg = tiny(remat_policy="none", scan_unroll="none")
    state_bytes = 2 * 64 * cfg.d_rec * 4
    zero, one, sixteen = (_grad_temp_bytes(cfg, n, 2) for n in (0, 1, 16))
    # The counts are constants here, so XLA compiles three programs; they differ by loop
    # bookkeeping (bytes), not by stored states (32 KiB each).
    assert abs(sixteen - one) < state_bytes / 100 and abs(sixteen - zero) < state_bytes
    # Control: the same 16 iterations taken with gradient do store activations.
    deep = _grad_temp_bytes(cfg.replace(mean_backprop_depth=18), 0, 18)
    assert deep - zero > 16 * state_bytes


def test_eval_at_any_recurrence_reuses_one_compiled_function(ref):
    _, model, params, ids, x0 = ref
    f = jax.jit(lambda p, ids, x0, R: model.apply({"params": p}, ids, recurrence=R, initial_state=x0))
    a, b = f(params, ids, x0, 2), f(params, ids, x0, 7)
    assert f._cache_size() == 1
    assert not np.allclose(a, b)
    np.testing.assert_allclose(b, model.apply({"params": params}, ids, recurrence=7, initial_state=x0), atol=1e-5)


def test_depth_sampling_is_a_function_of_the_key():
    cfg = tiny(mean_recurrence=8, mean_backprop_depth=4)
    key = jax.random.fold_in(jax.random.key(0), 17)  # (seed, step)
    n1, k1 = sample_depths(key, 4096, cfg)
    n2, k2 = sample_depths(key, 4096, cfg)
    np.testing.assert_array_equal(n1, n2)
    np.testing.assert_array_equal(k1, k2)
    total = np.asarray(n1 + k1)
    assert total.min() >= 1 and np.all(np.asarray(k1) == np.minimum(total, 4))
    assert abs(total.mean() - 8) < 0.2  # Poisson(8), clipped below at 1
    assert abs(total.var() - 8) < 1.0
    n3, _ = sample_depths(jax.random.fold_in(jax.random.key(0), 18), 4096, cfg)
    assert not np.array_equal(n1, n3)


def test_fixed_and_per_batch_schemes():
    n, k = sample_depths(jax.random.key(0), 5, tiny(sampling_scheme="fixed", mean_recurrence=6, mean_backprop_depth=2))
    assert n.tolist() == [4] * 5 and k.tolist() == [2] * 5
    n, k = sample_depths(jax.random.key(0), 64, tiny(sampling_unit="per-batch", mean_recurrence=8))
    assert len(set(np.asarray(n + k).tolist())) == 1
    n, k = sample_depths(jax.random.key(0), 5, tiny(sampling_scheme="fixed", mean_recurrence=1, mean_backprop_depth=3))
    assert n.tolist() == [0] * 5 and k.tolist() == [3] * 5


@pytest.mark.slow
def test_loop_inputs_are_a_pure_function_of_the_key_and_the_model_draws_nothing(ref):
    cfg, model, params, ids, _ = ref
    B, T = ids.shape
    a, b = draw_loop_inputs(jax.random.key(5), B, T, cfg), draw_loop_inputs(jax.random.key(5), B, T, cfg)
    for name in ("n", "k", "x0"):
        np.testing.assert_array_equal(a[name], b[name])
    assert a["n"].shape == a["k"].shape == (B,) and a["x0"].shape == (B, T, cfg.d_rec)
    assert not np.array_equal(a["x0"], draw_loop_inputs(jax.random.key(6), B, T, cfg)["x0"])
    # The same key in two places (train step, by hand) gives the same forward.
    run = lambda d: model.apply({"params": params}, ids, num_steps=(d["n"], d["k"]), initial_state=d["x0"])  # noqa: E731
    np.testing.assert_array_equal(run(a), run(b))
    with pytest.raises(ValueError, match="choose the depth"):
        model.apply({"params": params}, ids, initial_state=a["x0"])
    with pytest.raises(ValueError, match="is random: pass initial_state"):
        model.apply({"params": params}, ids, recurrence=2)


def test_like_init_state_is_truncated_normal_with_the_main_width_std():
    cfg = tiny(d_rec=128, d_rec_mlp=256, n_rec_heads=8)  # r != d: the std still comes from d
    x = np.asarray(draw_initial_state(jax.random.key(0), (64, 64, 128), cfg))
    std = np.sqrt(2 / (5 * 64))
    assert np.abs(x).max() <= 3 * std + 1e-7
    assert abs(x.std() / std - 0.9866) < 0.01  # the std of N(0, 1) truncated at +-3
    assert np.all(np.asarray(draw_initial_state(None, (2, 3, 4), tiny(state_init="zero"))) == 0)


def test_scan_unroll_full_writes_the_gradient_iterations_out():
    """The gradient iterations' scan (length mean_backprop_depth = 2) unrolled in full or not;
    the values agree (tests/test_remat.py), so this checks the setting reaches the scan."""
    from tests.helpers import loss_and_grad

    cfg = tiny()
    shapes = jax.eval_shape(lambda: nn.unbox(init_params(build(cfg), jax.random.key(0))))  # tracing needs no values
    for unroll, expected in (("none", 1), ("full", 2)):
        fn, params = loss_and_grad(cfg.replace(scan_unroll=unroll), params=shapes)
        unrolls = eqn_params(jax.make_jaxpr(fn)(params).jaxpr, "scan", "unroll")
        assert unrolls and set(unrolls) == {expected}, (unroll, unrolls)
