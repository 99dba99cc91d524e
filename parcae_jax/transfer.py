"""Trained runs out to the official format: `python -m parcae_jax.convert export`.

    python -m parcae_jax.convert export --workdir=RUN [--step=N] --output=DIR

reads the parameters of one checkpoint of RUN (the newest unless --step; the optimizer
state is not read: a partial orbax restore) and writes DIR/config.json and
DIR/model.safetensors in the official layout (convert.save_reference), which the official
`from_pretrained` and our `load_reference` both read. DIR must not hold a checkpoint
already, and is written under a temporary name and renamed, so a failed export leaves
nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from parcae_jax import model as M
from parcae_jax import storage
from parcae_jax.checkpoint import Checkpointer
from parcae_jax.convert import save_reference
from parcae_jax.model.config import ModelConfig
from parcae_jax.reference_config import ConversionError


def restore_params(workdir: str, step: int | None = None) -> tuple[int, ModelConfig, dict]:
    """(step, the run's ModelConfig, params as float32 NumPy) of one checkpoint of `workdir`."""
    directory = storage.resolve(workdir) / "checkpoints"
    if not directory.exists():  # and create nothing in a misspelled workdir
        raise ConversionError(f"{directory}: no checkpoints; is --workdir a training run?")
    ckpt = Checkpointer(directory, keep=1 << 30, async_save=False)
    try:
        steps = sorted(ckpt.manager.all_steps())
        if not steps:
            raise ConversionError(f"{directory}: no checkpoints; is --workdir a training run?")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ConversionError(f"{directory}: no checkpoint at step {step}; saved steps: {steps}")
        cfg = ModelConfig.from_mapping(ckpt.saved_config(step)["model"])
        abstract = jax.eval_shape(lambda: nn.unbox(M.init_params(M.build(cfg), jax.random.key(0))))
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=one, dtype=a.dtype), abstract)
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True)))
    finally:
        ckpt.close()
    return step, cfg, jax.tree.map(np.asarray, restored["state"]["params"])


def export_run(workdir: str, output: str, step: int | None = None) -> dict:
    """Writes checkpoint `step` (default: the newest) of `workdir` to `output` in the official format."""
    if os.path.exists(output) and os.listdir(output):
        raise ConversionError(f"{output} exists and is not empty; choose a new --output (nothing was overwritten)")
    step, cfg, params = restore_params(workdir, step)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        save_reference(staging, cfg, params)
        if os.path.exists(output):
            os.rmdir(output)  # empty, checked above
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"step": step, "output": output, "arch": cfg.arch,
            "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))}
