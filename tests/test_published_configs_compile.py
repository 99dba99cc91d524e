"""Every published config (Parcae and GPT, 140m ... 1.3b) builds its sharded train step for an
8-device mesh from abstract shapes: no weights are allocated, so a config that cannot train is
caught without training it.

Checked at the cheapest level that shows each property:
- every config is *lowered* (traced with all its logical-axis constraints, ~2-20 s each): the
  StableHLO's argument shardings put each device's train state at 8-12 bytes a parameter and
  split the batch over the data axis, the state is donated, and no sharding constraint leaves
  an activation of the whole global batch on every device;
- the smallest Parcae and GPT are also *compiled* (XLA's partitioner and memory analysis).

A full compile of every config (1.3b: ~4 min on 2 cores) is opt-in: `pytest -m full_compile
--full-compile` here, and `python -m parcae_jax.commands.memory_table` compiles every point for
its table. Other meshes are tested at small widths in test_train.py and test_sharding.py."""

import re

import jax
import numpy as np
import pytest

from parcae_jax.bench.step import compile_only, lower_only
from parcae_jax.training.defaults import load_shipped
from parcae_jax.training.validate import validate

PUBLISHED = ["140m", "370m", "770m", "1p3b", "gpt_140m", "gpt_370m", "gpt_770m", "gpt_1p3b"]
SMALLEST = ["140m", "gpt_140m"]


@pytest.mark.slow
@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_lowers_its_sharded_step_on_8_devices(name):
    config = load_shipped(name)  # as --config=NAME loads it
    config.model.scan_unroll = "none"  # auto's pick on an accelerator (on a CPU it writes the scan out)
    assert jax.device_count() == 8
    run = validate(config, check_data=False)
    assert list(run.mesh_shape) == [8, 1, 1]  # the config's own mesh: data parallel
    trainer, lowered = lower_only(config, run)
    B, T = config.train.batch_size, run.model.seq_len
    assert (B, T) == (256, 2048)
    # Data parallel: each device holds the whole float32 train state (parameters, Adam or Muon
    # moments: 8 to 12 bytes a parameter), as the shardings the step was lowered with say.
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract.params))
    per_device = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                     for x, s in zip(jax.tree.leaves(trainer.abstract), jax.tree.leaves(trainer.state_sharding)))
    assert 8 * params < per_device < 12 * params + 2**20
    text = lowered.as_text()
    main = re.search(r"func\.func public @main\((.*?)\) ->", text, re.S).group(1)
    args = re.findall(r"tensor<((?:\d+x)*)\w+> \{sdy\.sharding = #sdy\.sharding<@mesh, \[(.*?)\]>([^}]*)\}", main)
    batch_args = [a for a in args if a[0] == f"{B}x{T}x"]  # inputs, targets (segment ids unless unused)
    assert len(batch_args) >= 2 and all(a[1].startswith('{"data"') for a in batch_args), batch_args
    assert sum("tf.aliasing_output" in a[2] for a in args) == len(jax.tree.leaves(trainer.abstract))  # donated
    # No constraint replicates a [global batch, length, ...] activation (x0 drawn whole, a global
    # permutation of rows, lookups laid out like their tables once did).
    first_dims = re.findall(rf"sdy\.sharding_constraint %\S+ <@mesh, \[(\{{[^}}]*\}})[^>]*> : tensor<{B}x{T}x", text)
    assert len(first_dims) > 10  # the activations are constrained ...
    whole = [m for m in first_dims if "data" not in m]
    assert not whole, whole[:3]  # ... and each over the data axis


def _compiles(name):
    config = load_shipped(name)  # as --config=NAME loads it
    config.model.scan_unroll = "none"  # as on an accelerator
    out = compile_only(config, validate(config, check_data=False))
    assert out["mesh_shape"] == [8, 1, 1] and out["device_count"] == 8
    assert out["batch_size"] == 256 and out["seq_len"] == 2048
    assert 8 * out["params"] < out["argument_bytes"] < 12 * out["params"] + 2**20  # as the shardings say
    assert out["temp_bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALLEST)
def test_the_smallest_published_configs_compile_with_a_memory_analysis(name):
    _compiles(name)


@pytest.mark.full_compile
@pytest.mark.parametrize("name", [n for n in PUBLISHED if n not in SMALLEST])
def test_every_published_config_compiles(name):
    _compiles(name)
