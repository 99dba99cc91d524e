"""The injection: closed forms, and rho(A_bar) < 1 for any parameters (hypothesis)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from parcae_jax.model import param_shapes
from parcae_jax.model.injection import Injection, diagonal_coefficients, spectral_radius
from tests.helpers import tiny

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@settings(max_examples=300, deadline=None)
@given(arrays(np.float32, 16, elements=finite), arrays(np.float32, 16, elements=finite))
def test_diagonal_decay_lies_in_0_1_for_any_parameters(A_log, dt_bias):
    decay, dt = diagonal_coefficients(jnp.asarray(A_log), jnp.asarray(dt_bias))
    decay = np.asarray(decay)
    assert np.all(np.isfinite(decay)) and np.all(decay >= 0) and np.all(decay < 1)
    assert np.all(np.asarray(dt) >= 0)
    assert float(spectral_radius({"A_log": A_log, "dt_bias": dt_bias}, "diagonal")) < 1


@settings(max_examples=100, deadline=None)
@given(arrays(np.float32, 8, elements=st.floats(-6, 6, width=32)),
       arrays(np.float32, 8, elements=st.floats(-6, 6, width=32)))
def test_diagonal_decay_equals_the_closed_form(A_log, dt_bias):
    dt = np.log1p(np.exp(dt_bias.astype(np.float64)))
    expected = np.exp(-dt * np.exp(A_log.astype(np.float64)))
    decay, got_dt = diagonal_coefficients(jnp.asarray(A_log), jnp.asarray(dt_bias))
    np.testing.assert_allclose(decay, np.minimum(expected, 1 - 2**-24), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(got_dt, dt, rtol=2e-6)


def test_gradients_are_finite_at_extreme_parameters():
    g = jax.grad(lambda a, b: diagonal_coefficients(a, b)[0].sum(), argnums=(0, 1))(
        jnp.array([200.0, -200.0, 0.0]), jnp.array([-200.0, 200.0, 0.0]))
    assert all(np.all(np.isfinite(x)) for x in g)


def _injection_init(cfg):
    """The injection's own initialisation (the model's init runs this module; the whole model's
    would cost ~3 s of compiling here)."""
    x, e = jnp.zeros((1, 2, cfg.d_rec)), jnp.zeros((1, 2, cfg.d_model))
    return nn.unbox(Injection(cfg).init(jax.random.key(0), x, e)["params"])


def test_injections_against_numpy():
    rng = np.random.default_rng(0)
    x, e = rng.normal(size=(2, 5, 64)).astype(np.float32), rng.normal(size=(2, 5, 64)).astype(np.float32)
    for kind in ("diagonal", "linear", "add"):
        cfg = tiny(injection=kind)
        p = _injection_init(cfg) if kind != "add" else {}
        got = Injection(cfg).apply({"params": p}, x, e)
        if kind == "diagonal":
            dt = np.log1p(np.exp(p["dt_bias"]))
            want = np.exp(-dt * np.exp(p["A_log"])) * x + dt * (e @ np.asarray(p["B"]))
        elif kind == "linear":
            want = np.concatenate([x, e], -1) @ np.asarray(p["adapter"]["kernel"])
        else:
            want = x + e
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_diagonal_injection_starts_at_decay_sqrt_one_fifth_with_identity_B():
    params = _injection_init(tiny())
    assert set(params) == set(param_shapes(tiny())["core"]["injection"])  # what the model holds
    decay, dt = diagonal_coefficients(params["A_log"], params["dt_bias"])
    np.testing.assert_allclose(decay, np.sqrt(1 / 5), rtol=1e-6)
    np.testing.assert_allclose(dt, 0.804719, rtol=1e-5)
    np.testing.assert_array_equal(params["B"], np.eye(64))
    B = _injection_init(tiny(d_rec=32, d_rec_mlp=64, n_rec_heads=2))["B"]
    np.testing.assert_allclose(np.linalg.svd(np.asarray(B), compute_uv=False), 1.0, rtol=1e-5)  # orthogonal, gain 1


def test_spectral_radius_of_other_injections():
    assert float(spectral_radius({}, "add")) == 1.0
    rng = np.random.default_rng(0)
    for r, scale in ((64, 2.0), (64, 0.7), (256, 1.3)):
        state_part = rng.normal(size=(r, r)).astype(np.float32) * scale / np.sqrt(r)  # x_new = W x
        kernel = np.concatenate([state_part.T, rng.normal(size=(32, r)).astype(np.float32)])  # state rows first
        want = np.abs(np.linalg.eigvals(state_part)).max()
        got = float(spectral_radius({"adapter": {"kernel": kernel}}, "linear"))
        assert want <= got * (1 + 1e-4) and got <= want * r ** (1 / 2**11) * (1 + 1e-4)  # the Gelfand bound
