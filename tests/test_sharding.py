"""Where the train state lives on a mesh: under FSDP every large tensor of the state (weights
and optimizer moments) is split across devices, none replicated. Abstract shapes only."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from parcae_jax.defaults import load_shipped
from parcae_jax.train import Trainer
from parcae_jax.validate import validate


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
