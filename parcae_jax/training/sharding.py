"""The device mesh and the one list of logical-axis rules.

The model names every parameter axis and key activation axis (vocab, embed, heads, ...);
RULES maps those names to the mesh axes data / fsdp / tensor. A name whose mesh axis is
already taken on the same array falls through to the next rule for it (or none), so
activations [batch, length, embed] shard batch over (data, fsdp) and leave embed whole,
while parameters [embed, ...] shard embed over fsdp.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from parcae_jax.model.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", "tensor"),
    ("kv", "fsdp"),  # value-embedding tables [vocab, kv]: vocab took tensor; without this, FSDP replicates them
    ("embed", "fsdp"),
    ("state", "fsdp"),
    ("concat_embed", "fsdp"),
    ("length", None),
    ("head_dim", None),
)


def resolve_mesh_shape(shape, n_devices: int) -> tuple[int, int, int]:
    """mesh.shape with one -1 filled in; one line naming the fix when it cannot fit."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES) or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
        raise ConfigError(f"mesh.shape={shape} must give {len(MESH_AXES)} sizes for {MESH_AXES}, each >= 1, "
                          "with at most one -1 (fills the rest)")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise ConfigError(f"mesh.shape={shape}: {n_devices} devices are not divisible by {known}")
        shape = tuple(n_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != n_devices:
        raise ConfigError(f"mesh.shape={shape} needs {math.prod(shape)} devices but {n_devices} are available; "
                          "set --config.mesh.shape to use exactly those (e.g. (-1, 1, 1))")
    return shape


def make_mesh(shape, devices=None) -> jax.sharding.Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(boxed_abstract_params: Any, mesh: jax.sharding.Mesh) -> Any:
    """NamedShardings of the (unboxed) parameters from their logical axis names."""
    specs = nn.get_partition_spec(boxed_abstract_params)
    return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def _key_path(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def like_params(tree: Any, params_abstract: Any, params_sharding: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shardings for a tree that embeds parameter-shaped leaves (optimizer moments):
    a leaf whose path ends with a parameter's path and has its shape gets its sharding;
    anything else (step counts, small statistics) is replicated."""
    by_path = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(params_abstract),
                                      jax.tree.leaves(params_sharding)):
        by_path[_key_path(path)] = (leaf.shape, sharding)

    def pick(path, leaf):
        names = _key_path(path)
        for start in range(len(names)):
            hit = by_path.get(names[start:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)
