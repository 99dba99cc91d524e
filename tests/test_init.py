"""Initialisation (docs/design.md §6), checked by its closed-form consequences."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from parcae_jax.model import build, init_params
from parcae_jax.model.recurrence import draw_initial_state
from tests.helpers import tiny


@pytest.fixture(scope="module")
def fresh():
    cfg = tiny(d_rec=96, d_rec_mlp=192, n_rec_heads=6)  # r != d: both widths' stds are exercised
    return cfg, nn.unbox(init_params(build(cfg), jax.random.key(0)))


def singular_values(kernel, n_in_axes=1):
    k = np.asarray(kernel)
    return np.linalg.svd(k.reshape(int(np.prod(k.shape[:n_in_axes])), -1), compute_uv=False)


def test_matrices_are_scaled_orthogonal_with_the_width_of_their_own_module(fresh):
    cfg, p = fresh
    for width, block in ((64, p["prelude_0"]), (96, p["core"]["block_1"]), (64, p["coda_0"])):
        std = np.sqrt(2 / (5 * width))
        for kernel in (block["attn"]["q"]["kernel"], block["attn"]["k"]["kernel"], block["attn"]["v"]["kernel"],
                       block["mlp"]["fc"]["kernel"]):
            rows, cols = kernel.shape[0], int(np.prod(kernel.shape[1:]))
            np.testing.assert_allclose(singular_values(kernel), std * np.sqrt(max(rows, cols)), rtol=1e-4)
        assert not np.any(block["attn"]["o"]["kernel"]) and not np.any(block["mlp"]["proj"]["kernel"])
        assert np.all(block["norm_1"]["scale"] == 1) and np.all(block["norm_2"]["scale"] == 1)
    std = np.sqrt(2 / (5 * 64))
    np.testing.assert_allclose(singular_values(p["embed"]["embedding"]), std * np.sqrt(256), rtol=1e-4)
    np.testing.assert_allclose(singular_values(p["C"]["kernel"]), std * np.sqrt(96), rtol=1e-4)


def test_value_tables_and_gates(fresh):
    _, p = fresh
    table = np.asarray(p["value_embeds"]["3"])
    assert abs(table.mean()) < 0.02 and abs(table.std() - 1) < 0.02
    gate = np.asarray(p["coda_0"]["attn"]["ve_gate"])
    assert gate.shape == (32, 4) and np.abs(gate).max() <= 1 / np.sqrt(32)


def test_truncated_normal_without_orthogonal_init():
    p = nn.unbox(init_params(build(tiny(init_orthogonal=False, d_mlp=2048)), jax.random.key(0)))
    fc = np.asarray(p["prelude_0"]["mlp"]["fc"]["kernel"])
    std = np.sqrt(2 / (5 * 64))
    assert np.abs(fc).max() <= 3 * std + 1e-7 and abs(fc.std() / std - 0.9866) < 0.01
    assert not np.any(p["prelude_0"]["mlp"]["proj"]["kernel"])  # std 0 gives zeros (the official code crashes)


def rms(x, eps=1e-5):
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps)


@pytest.mark.parametrize("R", [1, 3])
def test_model_at_init_follows_the_closed_form_of_identity_blocks(R):
    """Blocks start as the identity, so x_R = a^R x0 + dt (1 - a^R)/(1 - a) e with B = I."""
    cfg = tiny()
    model = build(cfg)
    p = nn.unbox(init_params(model, jax.random.key(1)))
    ids = np.random.default_rng(0).integers(0, 256, (2, 16))
    x0 = np.asarray(draw_initial_state(jax.random.key(2), (2, 16, 64), cfg), np.float64)
    logits = model.apply({"params": p}, ids, recurrence=R, initial_state=x0.astype(np.float32))
    wte = np.asarray(p["embed"]["embedding"], np.float64)
    e = rms(wte[ids])  # prelude is the identity, then ln_prelude (scale 1)
    dt = np.log1p(np.exp(np.asarray(p["core"]["injection"]["dt_bias"], np.float64)))
    a = np.exp(-dt)
    x = a**R * x0 + dt * (1 - a**R) / (1 - a) * e
    want = rms(x @ np.asarray(p["C"]["kernel"], np.float64)) @ wte.T
    np.testing.assert_allclose(logits, want, atol=2e-5, rtol=1e-4)
