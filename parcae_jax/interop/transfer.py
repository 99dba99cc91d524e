"""Trained runs out to the official format (`commands.export`), and official weights in as the
first checkpoint of a run (`--mode=import`).

    python -m parcae_jax.commands.export --workdir=RUN [--step=N] --output=DIR

reads the parameters of one checkpoint of RUN (the newest unless --step; the optimizer
state is not read: a partial orbax restore) and writes DIR/config.json and
DIR/model.safetensors in the official layout (convert.save_reference), which the official
`from_pretrained` and our `load_reference` both read. DIR must not hold a checkpoint
already, and is written under a temporary name and renamed, so a failed export leaves
nothing half-written.

    python -m parcae_jax.main --mode=import --reference=DIR --config=CONFIG --workdir=RUN [--config.a.b=v ...]

writes checkpoint 0 of RUN: the
parameters of DIR, a fresh optimizer state, the data loader at its start, and CONFIG as the
run's config; `python -m parcae_jax.main --config=CONFIG --workdir=RUN` (same overrides) then
resumes from it: fine-tuning or continued pretraining. CONFIG's model must compute what DIR's
weights compute: every model field but the training and execution ones (FREE_FIELDS) must
agree, and a mismatch is one line naming the fields and their values.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from parcae_jax import model as M
from parcae_jax import storage
from parcae_jax.interop.convert import load_reference, save_reference
from parcae_jax.interop.reference_config import ConversionError
from parcae_jax.model.config import ModelConfig
from parcae_jax.runtime.checkpoint import Checkpointer
from parcae_jax.runtime.run_dir import CHECKPOINTS, RunDir
from parcae_jax.training.step import TrainState


def restore_params(workdir: str, step: int | None = None) -> tuple[int, ModelConfig, dict]:
    """(step, the run's ModelConfig, params as float32 NumPy) of one checkpoint of `workdir`."""
    step, saved, params = restore_run(workdir, step)
    return step, ModelConfig.from_mapping(saved["model"]), params


class Loaded(NamedTuple):
    """A model to run: its config, float32 params, tokenizer spec (None if the source names
    none) and seed (the run's: its evaluations' initial states; 0 for an official folder)."""

    cfg: ModelConfig
    params: dict
    tokenizer: str | None
    seed: int


def load_model(checkpoint: str, step: int | None = None) -> Loaded:
    """An official folder (config.json beside the weights; its tokenizer.json if it has one) or
    a training run (its --step, default the newest; the run's own tokenizer and seed): what
    generation and evaluation read."""
    if not storage.is_remote(checkpoint) and os.path.isfile(os.path.join(checkpoint, "config.json")):
        cfg, params = load_reference(checkpoint)
        tok = os.path.join(checkpoint, "tokenizer.json")
        return Loaded(cfg, params, tok if os.path.isfile(tok) else None, 0)
    if not storage.is_remote(checkpoint) and not os.path.isdir(checkpoint):
        raise ConversionError(f"--checkpoint={checkpoint}: no such folder; pass a training run's --workdir "
                              "or an official folder holding config.json")
    _, saved, params = restore_run(checkpoint, step)
    return Loaded(ModelConfig.from_mapping(saved["model"]), params, saved.get("data", {}).get("tokenizer"),
                  int(saved.get("seed", 0)))


def restore_run(workdir: str, step: int | None = None) -> tuple[int, dict, dict]:
    """(step, the run's saved config as a dict, params as float32 NumPy) of one checkpoint."""
    directory = RunDir(workdir).checkpoints
    if not directory.exists():  # and create nothing in a misspelled workdir
        raise ConversionError(f"{directory}: no checkpoints; is --workdir a training run?")
    ckpt = Checkpointer(directory, keep=1 << 30, async_save=False)
    configs: dict[int, dict] = {}

    def params_of(s: int, saved: dict):
        configs[s] = saved
        abstract = M.param_shapes(ModelConfig.from_mapping(saved["model"]))
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=one, dtype=a.dtype), abstract)
        return ckpt.manager.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True)))

    try:
        steps = sorted(ckpt.manager.all_steps())
        if not steps:
            raise ConversionError(f"{directory}: no checkpoints; is --workdir a training run?")
        if step is not None and step not in steps:
            shown = steps if len(steps) <= 6 else [*steps[:3], "...", *steps[-3:]]
            raise ConversionError(f"{directory}: no checkpoint at step {step}; saved steps: {shown}")
        # the newest that reads (as training resumes), or exactly the step named; nothing is moved
        step, restored = ckpt.restore_newest(None, set_aside=False, read=params_of, only=step)
    finally:
        ckpt.close()
    return step, configs[step], jax.tree.map(np.asarray, restored["state"]["params"])


def _count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def export_run(workdir: str, output: str, step: int | None = None) -> dict:
    """Writes checkpoint `step` (default: the newest) of `workdir` to `output` in the official format."""
    if storage.is_remote(output):
        raise ConversionError(f"--output={output}: export writes a local folder; copy it to the bucket afterwards")
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ConversionError(f"{output} exists and is not an empty folder; "
                              "choose a new --output (nothing was overwritten)")
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
            "params": _count(params)}


# Model fields that change how a model is trained or run, not what its weights compute.
FREE_FIELDS = frozenset({"seq_len", "mean_recurrence", "mean_backprop_depth", "sampling_scheme",
                         "sampling_unit", "init_orthogonal", "remat_policy", "block_remat", "scan_unroll", "loss_chunk",
                         "dtype", "attention_impl", "loss_impl", "reference_config"})


def import_reference(config, workdir: str, run, reference: str) -> dict:
    """Checkpoint 0 of a new run `workdir` (config, validated as `run`) holding `reference`'s weights."""
    from parcae_jax.data import dataset
    from parcae_jax.training.train import Trainer

    directory = RunDir(workdir).checkpoints
    if directory.exists() and any(directory.iterdir()):  # before reading gigabytes of weights
        raise ConversionError(f"{directory} already holds checkpoints; "
                              "import into a new --workdir (nothing was changed)")
    ref_cfg, params = load_reference(reference)
    ours = run.model.to_dict()
    differ = [f"{k}={v!r} (config has {ours[k]!r})" for k, v in ref_cfg.to_dict().items()
              if k not in FREE_FIELDS and v != ours[k]]
    if differ:
        raise ConversionError(f"{reference} does not fit this config: the weights have {', '.join(differ[:6])}; "
                              "pass those as --config.model.* overrides (here and when training)")
    trainer = Trainer(config, run)
    train_split, _ = dataset.open_splits(config.data, run.tokenizer, progress=jax.process_index() == 0)
    loader = dataset.train_loader(train_split, config.data, run.model.seq_len, config.train.batch_size, config.seed,
                                  jax.process_index(), jax.process_count())
    data_iter = iter(loader)
    with trainer.context():  # step 0 as init_state builds it, from these parameters instead of random ones
        placed = jax.device_put(params, trainer.state_sharding.params)
        state = jax.jit(lambda p: TrainState(jnp.int32(0), p, trainer.tx.init(p), jnp.int32(0)),
                        out_shardings=trainer.state_sharding)(placed)
    ckpt = Checkpointer(storage.make_dir(workdir) / CHECKPOINTS, config.ckpt.keep, async_save=False)
    try:
        if not ckpt.save(0, state, data_iter, config.to_dict(), wait=True):
            raise ConversionError(f"{reference}: its parameters are not finite; nothing was written")
    finally:
        ckpt.close()
        if hasattr(data_iter, "close"):
            data_iter.close()
    return {"workdir": workdir, "step": 0, "reference": reference,
            "params": _count(params)}
