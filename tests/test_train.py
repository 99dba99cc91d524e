"""The training system: sharded step, micro-batches, exact resume, mesh changes, skipped
steps, SIGTERM, and the entry point's checks."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae_jax.configs import tiny
from parcae_jax.runtime.checkpoint import Checkpointer, abstract_with_shardings
from parcae_jax.training.train import Trainer, evaluate_checkpoint, train
from parcae_jax.training.validate import validate
from tests.conftest import ONE_DEVICE_ENV, ROOT, XLA_CACHE
from tests.forkserver import run_module

# float32 compute (the tiny config says "fast": bf16 on CPUs with BF16 instructions), so that
# the equivalence checks below are about sharding and accumulation, not bf16 roundings.
# One core block: what these tests train is the machinery around a model (a second block only
# adds compile time; the model's own tests use two).
SMALL = dict(d_model=32, n_heads=2, n_kv_heads=2, d_mlp=64, d_rec=32, d_rec_mlp=64, n_rec_heads=2, n_core=1,
             block_size=32, seq_len=32, mean_recurrence=3, mean_backprop_depth=2, dtype="float32")


def small_config(**train):
    config = tiny.get_config()
    config.model.update(SMALL)
    # bf16 Muon turns last-bit differences (another reduction order) into bf16 flips of an
    # lr-sized update; float32 Muon keeps equivalence checks about the sharding itself.
    config.optim.muon_dtype = "float32"
    config.train.update({**dict(steps=20, batch_size=8, log_every=1, eval_every=0, eval_batches=1), **train})
    config.ckpt.update(every=5, keep=5, async_save=True)
    return config


def one_device(config):
    """(Trainer, Run) of `config` on one device: the in-process reference for runs that
    `run_main` stops and resumes, which also train on one device."""
    run = validate(config, n_devices=1)
    return Trainer(config, run, jax.devices()[:1]), run


def batch(trainer, seed=0, B=8, T=32):
    ids = np.random.default_rng(seed).integers(0, 257, (B, T + 1)).astype(np.int32)
    local = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((B, T), np.int32)}
    return {k: jax.device_put(v, trainer.batch_sharding) for k, v in local.items()}


def one_step(config, devices, trainer=None):
    trainer = trainer or Trainer(config, validate(config, n_devices=len(devices), check_data=False), devices)
    with trainer.context():
        state = trainer.fresh_state()
        state, metrics = trainer.train_step(state, batch(trainer), trainer.schedule)
    return jax.device_get(state.params), float(metrics["loss"])


def assert_trees_close(a, b, atol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=0), a, b)


@pytest.fixture(scope="module")
def first_step():
    """The small config's Trainer on one device, and its first step from the fresh state
    (params, loss): the baseline that sharded and micro-batched steps must equal."""
    config = small_config()
    trainer = Trainer(config, validate(config, n_devices=1, check_data=False), jax.devices()[:1])
    return trainer, one_step(config, jax.devices()[:1], trainer)


@pytest.mark.slow
def test_one_step_on_a_2x2x2_mesh_equals_one_device(first_step):
    config = small_config()
    single_params, single_loss = first_step[1]
    config.mesh.shape = (2, 2, 2)
    mesh_params, mesh_loss = one_step(config, jax.devices())
    assert abs(mesh_loss - single_loss) < 1e-5
    assert_trees_close(mesh_params, single_params, 1e-5)


@pytest.mark.slow
def test_k_micro_batches_equal_one_batch_k_times_larger(first_step):
    config = small_config()
    whole_params, whole_loss = first_step[1]
    config.train.microbatches = 4
    micro_params, micro_loss = one_step(config, jax.devices()[:1])
    assert abs(micro_loss - whole_loss) < 1e-5
    assert_trees_close(micro_params, whole_params, 1e-5)


@pytest.mark.slow
def test_a_non_finite_gradient_step_is_skipped(first_step):
    trainer = first_step[0]
    with trainer.context():
        state = trainer.fresh_state()
        before = jax.device_get(state)
        poisoned = state.replace(params=jax.tree.map(lambda x: x, state.params))
        poisoned.params["ln_f"]["scale"] = poisoned.params["ln_f"]["scale"].at[0].set(jnp.inf)
        kept = jax.device_get(poisoned)
        after, metrics = trainer.train_step(poisoned, batch(trainer), trainer.schedule)
        after = jax.device_get(after)
    assert bool(metrics["skipped"]) and int(after.skipped) == 1 and int(after.step) == 1
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), after.params, kept.params)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), after.opt_state, before.opt_state)


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def final_params(config, workdir):
    trainer = Trainer(config, validate(config, check_data=False))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), 5)
    step = ckpt.latest_step()
    with trainer.context():
        state = ckpt.restore(step, abstract_with_shardings(trainer.abstract, trainer.state_sharding))
    ckpt.close()
    return step, jax.device_get(state.params)


def run_main(workdir, *flags, env=None):
    """python -m parcae_jax.main with the small config on one device (a subprocess, killable),
    through the compilation cache: a test's second run of a command loads the steps the first
    compiled. Its in-process reference: `one_device`."""
    overrides = [f"--config.model.{k}={v}" for k, v in SMALL.items()] + [
        "--config.train.steps=20", "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.train.eval_batches=1", "--config.ckpt.every=5", "--config.ckpt.keep=5",
        "--config.optim.muon_dtype=float32", f"--config.compilation_cache_dir={XLA_CACHE}"]
    return subprocess.Popen([sys.executable, "-m", "parcae_jax.main", "--config=configs/tiny.py",
                             f"--workdir={workdir}", *overrides, *flags],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_DEVICE_ENV, **(env or {})})


def wait_for_step(workdir, step, proc, timeout=300):
    path = os.path.join(workdir, "metrics.jsonl")
    start = time.time()
    while time.time() - start < timeout:
        if os.path.exists(path) and max(losses(workdir), default=0) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise TimeoutError


@pytest.fixture(scope="module")
def uninterrupted_20(tmp_path_factory):
    """(the workdir of the small config's uninterrupted 20-step run on one device, its Trainer
    and Run: resumes of the same config reuse its compiled steps)."""
    workdir = tmp_path_factory.mktemp("whole")
    config = small_config()
    trainer, run = one_device(config)
    train(config, str(workdir), run, trainer)
    return workdir, trainer, run


def _kill_mid_save(workdir, proc):
    """SIGKILL as soon as orbax is writing a checkpoint after the first (its temporary folder exists)."""
    folder = workdir / "checkpoints"
    while proc.poll() is None:
        names = os.listdir(folder) if folder.exists() else []
        if "5" in names and any(".orbax-checkpoint-tmp" in n for n in names):
            proc.send_signal(signal.SIGKILL)
            return
        time.sleep(0.001)
    raise AssertionError("the run ended before a save could be caught in progress")


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["between checkpoints", "while a checkpoint is written"])
def test_sigkill_and_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted_20, moment):
    config = small_config()
    whole, trainer, run = uninterrupted_20
    killed = run_main(tmp_path / "cut")
    if moment == "between checkpoints":
        wait_for_step(tmp_path / "cut", 12, killed)
        killed.send_signal(signal.SIGKILL)
    else:
        _kill_mid_save(tmp_path / "cut", killed)
    killed.wait()
    cut_at = Checkpointer(str(tmp_path / "cut" / "checkpoints"), 5).latest_step()
    assert cut_at is not None and 5 <= cut_at < 20
    train(config, str(tmp_path / "cut"), run, trainer)  # resumes from the checkpoint
    assert losses(tmp_path / "cut") == losses(whole)  # every step, bit for bit
    (s1, p1), (s2, p2) = final_params(config, whole), final_params(config, tmp_path / "cut")
    assert s1 == s2 == 20
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


@pytest.mark.slow
def test_checkpoint_from_mesh_1x8x1_resumes_on_2x4x1(tmp_path):
    config = small_config(steps=6)
    config.mesh.shape = (1, 8, 1)
    config.ckpt.every = 3
    train(config, str(tmp_path / "a"), validate(config))
    step, saved = final_params(config, tmp_path / "a")
    config.mesh.shape = (2, 4, 1)
    step2, restored = final_params(config, tmp_path / "a")  # the same checkpoint, laid out on the new mesh
    assert step == step2 == 6
    jax.tree.map(np.testing.assert_array_equal, saved, restored)
    config.train.steps = 9
    train(config, str(tmp_path / "a"), validate(config))  # and training goes on there
    assert sorted(losses(tmp_path / "a")) == list(range(1, 10))


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_that_resumes_exactly(tmp_path, sig, code, uninterrupted_30):
    """SIGTERM (preemption) and Ctrl-C save after the current step and exit 128 + signal, a code
    schedulers read as 'requeue'; the same command then resumes to the uninterrupted losses."""
    proc = run_main(tmp_path, "--config.train.steps=30", "--config.ckpt.every=0")
    wait_for_step(tmp_path, 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    saved = Checkpointer(str(tmp_path / "checkpoints"), 5).latest_step()
    assert f"stopped by {sig.name} after step {saved}; checkpoint saved" in err
    assert 3 <= saved < 30 and max(losses(tmp_path)) == saved
    config = small_config(steps=30)
    losses_30, trainer, run = uninterrupted_30
    train(config, str(tmp_path), run, trainer)
    assert losses(tmp_path) == losses_30


@pytest.mark.slow
def test_the_tiny_run_leaves_metrics_events_and_checkpoints(tmp_path):
    config = small_config(steps=6, eval_every=3, log_every=2)
    config.ckpt.every = 3
    last = train(config, str(tmp_path), validate(config))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 3, 4, 6] and all("loss" in r for r in rows)
    assert {"eval/loss_r1", "eval/loss_r2", "eval/loss_r3", "eval/unigram_loss", "rho", "depth_mean",
            "tokens_per_sec", "lr", "muon_lr", "grad_norm", "state_norm"} <= set(rows[-1])
    assert rows[-1]["rho"] < 1 and last["step_time_s"] > 0
    assert os.listdir(tmp_path / "tensorboard") and sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    # --mode=eval on the final checkpoint gives the losses the run logged at its last eval
    evaluated = evaluate_checkpoint(config, str(tmp_path), validate(config))
    assert evaluated["step"] == 6
    for key in ("eval/loss_r1", "eval/loss_r2", "eval/loss_r3"):
        assert evaluated[key] == pytest.approx(rows[-1][key], abs=1e-6)


def main_error(*args):
    out = run_module("parcae_jax.main", [*args], cwd=ROOT,
                         timeout=120, env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    return out.stderr


def test_entry_point_rejects_inconsistent_settings(tmp_path):
    tiny_cfg = "--config=configs/tiny.py"
    assert "not divisible by the data-parallel size 8" in main_error(tiny_cfg, "--mode=bench",
                                                                      "--config.train.batch_size=12")
    assert "needs 16 devices but 8 are available" in main_error(tiny_cfg, "--mode=bench", "--config.mesh.shape=(4,4,1)")
    assert "needs --workdir" in main_error(tiny_cfg)
    assert "data.path=/nowhere: no such directory" in main_error(
        tiny_cfg, f"--workdir={tmp_path}", "--config.data.source=prepared", "--config.data.path=/nowhere")
    assert "optim.schedule='wsd' is unknown" in main_error(tiny_cfg, "--mode=bench", "--config.optim.schedule=wsd")
