"""Every published config (Parcae and GPT, 140m ... 1.3b) builds its sharded train step and
compiles it ahead of time for an 8-device mesh, from abstract shapes: no weights are
allocated, so a config that cannot train is caught without training it.

Each config keeps its own mesh (data parallel over the 8 devices). Other meshes are tested
at small widths in test_train.py: compiling a 1.3b step for a (2, 2, 2) mesh takes ~7 min
on 2 CPU cores, against ~1 min for (8, 1, 1)."""

import importlib

import jax
import pytest

from parcae_jax.bench import compile_only
from parcae_jax.validate import validate

PUBLISHED = ["140m", "370m", "770m", "1p3b", "gpt_140m", "gpt_370m", "gpt_770m", "gpt_1p3b"]


@pytest.mark.slow
@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_compiles_its_sharded_step_on_8_devices(name):
    config = importlib.import_module(f"parcae_jax.configs.{name}").get_config()
    assert jax.device_count() == 8
    out = compile_only(config, validate(config, check_data=False))  # the config's own mesh: (8, 1, 1)
    assert out["mesh_shape"] == [8, 1, 1] and out["device_count"] == 8
    assert out["batch_size"] == 256 and out["seq_len"] == 2048
    # Data parallel: each device holds the whole float32 train state (parameters, Adam or Muon
    # moments: 8 to 12 bytes a parameter) and its share of the batch.
    assert 8 * out["params"] < out["argument_bytes"] < 12 * out["params"] + 2**20
    assert out["temp_bytes"] > 0
