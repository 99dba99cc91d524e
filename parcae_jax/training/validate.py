"""Whole-config validation, before anything is compiled: one ConfigError / DataError line
naming the field and the fix."""

from __future__ import annotations

import dataclasses
import math

import jax

from parcae_jax.data import dataset
from parcae_jax.data.tokenizer import Tokenizer
from parcae_jax.model.config import ConfigError, ModelConfig
from parcae_jax.training.fused_adamw import IMPLS as UPDATE_IMPLS
from parcae_jax.training.fused_adamw import uses_kernel
from parcae_jax.training.optim import OPTIMIZERS, SCHEDULES
from parcae_jax.training.sharding import resolve_mesh_shape


@dataclasses.dataclass(frozen=True)
class Run:
    """What `validate` resolved from a config, for train/eval/bench to use instead of re-deriving it.

    model: the validated ModelConfig (a dtype given as "auto" resolved); mesh_shape: (data, fsdp,
    tensor) sizes with any -1 filled in for the device count; eval_recurrences: sorted distinct
    recurrence counts to evaluate at (default 1, 2, 4 and model.mean_recurrence); tokenizer:
    the loaded data tokenizer, or None when validate ran with check_data=False."""

    model: ModelConfig
    mesh_shape: tuple[int, int, int]
    eval_recurrences: tuple[int, ...]
    tokenizer: Tokenizer | None


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


FLOAT32_MAX = 3.4028234663852886e38


def _non_finite(tree: dict, prefix: str = "") -> list[str]:
    """Config keys holding inf or nan, or a number float32 (what the step computes in) cannot hold."""
    bad = []
    for key, value in tree.items():
        if isinstance(value, dict):
            bad += _non_finite(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            bad.append(f"{prefix}{key}={value}")
    return bad


def validate(config, n_devices: int | None = None, process_count: int | None = None, check_data: bool = True) -> Run:
    """Checks a whole run config before anything is compiled or written; returns the resolved Run.

    In order: every float in the config is finite and fits float32; config.model builds a
    ModelConfig (unknown keys, bad values and inconsistent shapes fail there); mesh.shape fits
    `n_devices` (default jax.device_count()) and its data x fsdp size is a multiple of
    `process_count` (default jax.process_count()); train.* (counts >= 1, batch_size divisible
    by microbatches, micro-batches by data x fsdp, and by the processes), ckpt.*, optim.* (known
    optimizer and schedule, rates, betas, warmup, Newton-Schulz steps, Muon dtype, an update_impl
    that can run here), wandb.mode,
    profile.* and train.eval_recurrences; last, with `check_data`, config.data via
    dataset.check (source, path or manifest, tokenizer, its vocabulary against
    model.vocab_size), which loads the tokenizer and may read a gs:// manifest.

    Raises at the first failure, with a one-line message naming the field and the fix:
    ConfigError for the model, mesh, train, optim, ckpt, wandb and profile settings, DataError
    (from dataset.check) for config.data."""
    bad = _non_finite(config.to_dict())
    _need(not bad, f"{', '.join(bad)}: must be a finite number (within float32's range)")
    model = ModelConfig.from_mapping(config.model)
    n_devices = n_devices if n_devices is not None else jax.device_count()
    process_count = process_count if process_count is not None else jax.process_count()
    try:
        mesh = resolve_mesh_shape(config.mesh.shape, n_devices)
    except ConfigError as e:
        if process_count == 1:
            raise
        raise ConfigError(f"{e} [{process_count} processes x {n_devices // process_count} devices]") from None
    dp = mesh[0] * mesh[1]
    _need(dp % process_count == 0,
          f"mesh.shape={mesh} splits the batch over data x fsdp = {dp} device groups, not a multiple of the "
          f"{process_count} processes (each process loads its own rows); use e.g. --config.mesh.shape=(-1,1,1)")
    t, o, c = config.train, config.optim, config.ckpt
    for name in ("steps", "batch_size", "microbatches", "log_every", "eval_batches"):
        _need(getattr(t, name) >= 1, f"train.{name}={getattr(t, name)} must be >= 1")
    _need(t.eval_every >= 0 and c.every >= 0, "train.eval_every and ckpt.every must be >= 0 (0: never)")
    _need(c.keep >= 1, f"ckpt.keep={c.keep} must be >= 1")
    _need(math.isfinite(c.lock_lease_s) and c.lock_lease_s >= 3,
          f"ckpt.lock_lease_s={c.lock_lease_s} must be a number of seconds >= 3")
    _need(t.batch_size % t.microbatches == 0,
          f"train.batch_size={t.batch_size} is not divisible by train.microbatches={t.microbatches}")
    micro = t.batch_size // t.microbatches
    _need(micro % dp == 0, f"train.batch_size={t.batch_size} gives micro-batches of {micro} sequences, not divisible "
                           f"by the data-parallel size {dp} (mesh data x fsdp = {mesh[0]} x {mesh[1]}); "
                           f"use a multiple of {dp * t.microbatches}")
    _need(t.batch_size % process_count == 0,
          f"train.batch_size={t.batch_size} is not divisible by the {process_count} processes")
    _need(t.max_consecutive_skips >= 0,
          f"train.max_consecutive_skips={t.max_consecutive_skips} must be >= 0 (0: never stop)")
    _need(t.clip_norm >= 0, f"train.clip_norm={t.clip_norm} must be >= 0 (0: no clipping)")
    _need(o.name in OPTIMIZERS, f"optim.name={o.name!r} is unknown; set it to one of {'|'.join(OPTIMIZERS)}")
    _need(o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r} is unknown; set it to one of {'|'.join(SCHEDULES)}")
    _need(o.lr > 0 and o.muon_lr > 0, "optim.lr and optim.muon_lr must be > 0")
    _need(0 <= o.b1 < 1 and 0 <= o.b2 < 1 and 0 <= o.muon_momentum < 1, "optim betas and momentum must be in [0, 1)")
    _need(0 <= o.cooldown_fraction <= 1, f"optim.cooldown_fraction={o.cooldown_fraction} must be in [0, 1]")
    _need(0 <= o.warmup_steps < t.steps, f"optim.warmup_steps={o.warmup_steps} must be in [0, train.steps)")
    _need(1 <= o.muon_ns_steps <= 5, f"optim.muon_ns_steps={o.muon_ns_steps} must be 1..5 (Polar Express has 5)")
    _need(o.muon_dtype in ("bfloat16", "float32"), f"optim.muon_dtype={o.muon_dtype!r} must be bfloat16 or float32")
    _need(o.update_impl in UPDATE_IMPLS, f"optim.update_impl={o.update_impl!r} is unknown; set it to one of "
          f"{'|'.join(UPDATE_IMPLS)}")
    if o.update_impl == "cpu":  # refused here, before anything compiles, where the kernel cannot run
        uses_kernel(o, math.prod(mesh))
    _need(config.wandb.mode in ("online", "offline", "disabled"),
          f"wandb.mode={config.wandb.mode!r} must be online, offline or disabled")
    _need(config.profile.steps >= 0 and config.profile.start_step >= 0, "profile.start_step and steps must be >= 0")
    recurrences = tuple(t.eval_recurrences) if t.eval_recurrences else (1, 2, 4, model.mean_recurrence)
    _need(all(isinstance(r, int) and r >= 1 for r in recurrences),
          f"train.eval_recurrences={recurrences} must be integers >= 1")
    recurrences = tuple(sorted(set(recurrences)))
    tok = dataset.check(config.data, model.vocab_size, jax.process_count()) if check_data else None
    return Run(model, mesh, recurrences, tok)
