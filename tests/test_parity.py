"""Parity with the official PyTorch implementation, against its saved outputs (fp32, CPU)."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from parcae_jax.interop.convert import key_map, load_reference
from parcae_jax.model import build
from parcae_jax.model.xent import mean_cross_entropy
from tests.conftest import FIXTURES
from tests.helpers import get, shifted_labels

PARCAE = FIXTURES / "reference_parcae_tiny"
GPT = FIXTURES / "reference_gpt_tiny"


@pytest.fixture(scope="module")
def parcae():
    cfg, params = load_reference(str(PARCAE))
    model = build(cfg)

    @jax.jit  # R is traced: one compile for every recurrence
    def forward(ids, R, x0):
        logits, inter = model.apply({"params": params}, ids, recurrence=R, initial_state=x0, mutable=["intermediates"])
        return logits, inter["intermediates"]["prelude_out"][0], inter["intermediates"]["state"][0]

    ids = np.load(PARCAE / "input_ids.npy")
    return cfg, model, params, ids, np.load(PARCAE / "state_init.npy"), forward


@pytest.mark.parametrize("R", [1, 2, 4, 8])
def test_parcae_logits_state_and_prelude_match_reference(parcae, R):
    _, _, _, ids, x0, forward = parcae
    logits, prelude_out, state = forward(ids, R, x0)
    assert logits.dtype == np.float32 and logits.shape == (2, 64, 256)
    np.testing.assert_allclose(logits, np.load(PARCAE / f"logits_r{R}.npy"), atol=1e-4, rtol=0)
    np.testing.assert_allclose(state, np.load(PARCAE / f"state_r{R}.npy"), atol=1e-4, rtol=0)
    np.testing.assert_allclose(prelude_out, np.load(PARCAE / "prelude_out.npy"), atol=1e-4, rtol=0)
    assert forward._cache_size() == 1


def test_gpt_logits_match_reference():
    cfg, params = load_reference(str(GPT))
    logits = build(cfg).apply({"params": params}, np.load(GPT / "input_ids.npy"))
    np.testing.assert_allclose(logits, np.load(GPT / "logits.npy"), atol=1e-4, rtol=0)


def test_train_mode_gradients_match_reference(parcae):
    """2 steps without gradient, then 2 with gradient (num_steps_pair=[2, 2] in the official code)."""
    cfg, model, params, ids, x0, _ = parcae
    labels = shifted_labels(ids)

    def loss_fn(p):
        return mean_cross_entropy(model.apply({"params": p}, ids, num_steps=(2, 2), initial_state=x0), labels)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    meta = json.loads((PARCAE / "config.json").read_text())["grad_check"]
    assert abs(float(loss) - meta["loss"]) < 1e-5
    reference = load_file(PARCAE / "grads_small.safetensors")
    checked = 0
    for entry in key_map(cfg):
        g = np.asarray(get(grads, entry.path))
        torch_layout = g.reshape(int(np.prod(g.shape[:entry.n_in_axes])), -1).T if entry.linear else g
        norm = np.linalg.norm(g)
        assert abs(norm - meta["grad_norms"][entry.key]) <= 1e-4 * meta["grad_norms"][entry.key], entry.key
        if entry.key in reference:
            ref = reference[entry.key]
            assert np.linalg.norm(torch_layout - ref) <= 1e-4 * np.linalg.norm(ref), entry.key
            np.testing.assert_allclose(torch_layout, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
            checked += 1
    assert checked == len(reference) == 14
