"""Where the train state lives on a mesh: under FSDP every large tensor of the state (weights
and optimizer moments) is split across devices, none replicated. Abstract shapes only."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from parcae_jax.training.defaults import load_shipped
from parcae_jax.training.train import Trainer
from parcae_jax.training.validate import validate


@pytest.mark.parametrize("name,mesh", [("140m", (1, 8, 1)), ("gpt_140m", (1, 4, 2))])
def test_fsdp_leaves_no_large_state_tensor_replicated(name, mesh):
    config = load_shipped(name)
    config.mesh.shape, config.train.batch_size = mesh, 8
    trainer = Trainer(config, validate(config, check_data=False))
    replicated = []
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(trainer.abstract)[0],
                                      jax.tree.leaves(trainer.state_sharding)):
        size = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        if size > 2**20 and sharding.shard_shape(leaf.shape) == leaf.shape:
            replicated.append(jax.tree_util.keystr(path))
    assert not replicated, replicated  # the value-embedding tables and their moments once were



@pytest.mark.slow
def test_no_device_holds_an_activation_of_the_whole_global_batch():
    """Tiny Parcae (value embeddings, per-sequence depths) on an 8-device FSDP mesh, 2 rows per
    device: after partitioning, no array of the step is [global batch, length, ...]. Each such
    array sat on every device: x0 drawn whole, the depth sort's global permutation gathering
    every row, the value-embedding lookups laid out like their tables (a 140m step at one row
    per chip once estimated 10 GB per chip on 256 chips; 2.75 GB for the GPT of that size)."""
    import re

    import jax.numpy as jnp

    from parcae_jax.runtime.checkpoint import abstract_with_shardings

    config = load_shipped("tiny")
    config.mesh.shape, config.train.batch_size = (1, 8, 1), 16
    config.model.dtype = "float32"
    trainer = Trainer(config, validate(config, check_data=False))
    B, T = config.train.batch_size, config.model.seq_len
    state = abstract_with_shardings(trainer.abstract, trainer.state_sharding)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=trainer.batch_sharding)
             for k in ("inputs", "targets", "segment_ids")}
    with trainer.context():
        hlo = trainer.train_step.lower(state, batch, trainer.schedule).compile().as_text()
    whole = sorted(set(re.findall(rf"\b(?:f32|bf16|u32|s32)\[{B},{T},[\d,]+\]", hlo)))
    assert not whole, whole
    assert re.search(rf"f32\[{B // 8},{T},{config.model.d_rec}\]", hlo)  # the per-device state is there
