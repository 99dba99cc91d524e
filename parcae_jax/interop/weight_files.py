"""The weight files of an official checkpoint folder, whatever format they came in.

A hub snapshot or an official training output holds `config.json` beside one of
`model.safetensors`, `pytorch_model.bin`, `model.pt`, or a sharded set named by
`model.safetensors.index.json` / `pytorch_model.bin.index.json`. `open_weights` maps each
official key (with the `_orig_mod.` / `module.` / `_forward_module.` prefixes that
torch.compile, DDP and Fabric leave stripped) to a function that reads that one tensor, so a
converter copies tensors one at a time: a sharded 1.3b checkpoint never sits in memory twice.
PyTorch pickles go through torch_pickle.py, which reads them without torch and refuses any
pickle that names more than a state dict of tensors.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from parcae_jax.interop.reference_config import ConversionError
from parcae_jax.interop.torch_pickle import UnsafeCheckpoint, read_state_dict

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "model.pt")
WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_forward_module.")

Tensors = dict[str, Callable[[], np.ndarray]]


def strip_prefixes(key: str) -> str:
    """`module._orig_mod.transformer.wte.weight` -> `transformer.wte.weight`."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def weight_file(path: str) -> str:
    """The first of WEIGHT_FILES present in the folder, or one line naming what is there."""
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return name
    found = sorted(n for n in os.listdir(path) if n != "config.json")[:6] if os.path.isdir(path) else []
    raise ConversionError(f"{path}: no weights; expected one of {', '.join(WEIGHT_FILES)}"
                          f"{f' (found {found})' if found else ''}")


def _read_one(path: str) -> Tensors:
    """key -> reader for one safetensors or torch file."""
    name = os.path.basename(path)
    if name.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            handle = safe_open(path, framework="numpy")
            keys = list(handle.keys())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError for a damaged file
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
        return {k: (lambda k=k: handle.get_tensor(k)) for k in keys}
    try:
        tensors = read_state_dict(path)  # memory-mapped views: nothing is read until used
    except UnsafeCheckpoint as e:
        raise ConversionError(f"{path}: {e}") from None
    return {k: (lambda v=v: v) for k, v in tensors.items()}


def open_weights(path: str) -> tuple[str, Tensors]:
    """(the weight file found, official key -> a function reading that tensor) for the folder."""
    name = weight_file(path)
    files = [name]
    if name.endswith(".index.json"):
        try:
            with open(os.path.join(path, name)) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ConversionError(f"{path}/{name}: not a shard index with a weight_map ({e})") from None
        outside = [f for f in files if not isinstance(f, str) or os.path.basename(f) != f or f in ("", ".", "..")]
        if outside:
            raise ConversionError(f"{path}/{name}: shard names must be files of the folder, not {outside[:3]}")
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise ConversionError(f"{path}/{name}: names shards that are not there: {missing[:3]}")
    tensors: Tensors = {}
    for file in files:
        for key, read in _read_one(os.path.join(path, file)).items():
            key = strip_prefixes(key)
            if key in tensors:
                raise ConversionError(f"{path}: {key} appears twice (in {file} and before)")
            tensors[key] = read
    return name, tensors
