"""Generation's RoPE: constant tables read at traced positions, q and k in the permuted channel order.

That the rotation itself is the official one is tested against NumPy in test_model.py, and
that generation with its cache equals the full forward in test_generate.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae_jax.infer import decode, generator
from parcae_jax.infer.sampling import Sampling
from parcae_jax.interop import convert
from parcae_jax.model.rope import ropes
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def parcae():
    return convert.load_reference(str(FIXTURES / "reference_parcae_tiny"))


def test_generation_reads_rope_tables_instead_of_evaluating_sin_and_cos(parcae):
    """A row's positions are traced (left padding, the decode step's offset). Tables computed
    from them were fused by XLA into each rotation, evaluating sin and cos per element of q and
    k (a fifth of an 8 x 1024 prefill); the programs index constant tables instead. Lowered only."""
    cfg, params = parcae
    gen = generator.Generator(cfg, params, recurrence=2)
    S = 64
    plan = gen._plan(max_len=S)
    prefill, step = generator._compiled(plan, Sampling())
    pad, key = jnp.zeros((2,), jnp.int32), jax.random.key(0)
    x0 = generator.initial_states(0, np.zeros(2, np.int32), S, cfg)
    ids = jnp.ones((2, 16), jnp.int32)
    cache = jax.eval_shape(lambda: decode.init_cache(plan, pad))
    for lowered in (prefill.lower(gen.params, ids, pad, x0, key), step.lower(gen.params, cache, ids[:, 0], x0, key, 1)):
        text = lowered.as_text()
        assert "stablehlo.cosine" not in text and "stablehlo.sine" not in text
        table = f"(tensor<{S}x1x{cfg.head_dim // 2}xf32>"  # a [S, 1, D/2] table, the gather's operand
        assert any("stablehlo.gather" in line and table in line for line in text.splitlines())


def test_tables_read_at_positions_equal_tables_computed_there(parcae):
    """Reading the constant tables at left-padded positions gives what computing them there
    gives; padding positions (negative) read position 0."""
    cfg, _ = parcae
    pos = np.arange(10)[None, :] - np.array([[0], [3]])
    read = jax.jit(lambda p: ropes(cfg, p, table_len=16))(jnp.asarray(pos))
    want = ropes(cfg, np.maximum(pos, 0))
    for (c, s), (wc, ws) in zip(read, want):
        np.testing.assert_array_equal(np.asarray(c), wc)
        np.testing.assert_array_equal(np.asarray(s), ws)
