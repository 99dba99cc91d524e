"""Runs that cannot be broken by accident: a damaged latest checkpoint is set aside and the one
before it resumes exactly; a resume that changes what the run means is refused (or, accepted
on purpose, continues from the right place in the data); non-finite updates are skipped and a
run that only skips stops with exit 3."""

import os
import shutil
import subprocess
import threading
import time

import jax
import numpy as np
import optax
import pytest

from parcae_jax.data import dataset
from parcae_jax.model.config import ConfigError
from parcae_jax.runtime.checkpoint import Checkpointer
from parcae_jax.runtime.resume import ResumeRefused, check
from parcae_jax.training.step import init_state, make_train_step
from parcae_jax.training.train import Trainer, train
from parcae_jax.training.validate import validate
from tests.helpers import tiny
from tests.test_train import losses, one_device, run_main, small_config


def steady_config(steps):
    """A run whose first steps do not depend on train.steps (constant lr, no decaying Muon
    weight decay): 8 steps then 4 more equal 12 uninterrupted ones."""
    config = small_config(steps=steps)
    config.optim.update(schedule="constant", muon_weight_decay=0.0)
    config.ckpt.update(every=4, keep=5)
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(trainer on one device, the uninterrupted 12-step losses, a workdir stopped at step 8:
    checkpoints 4, 8)."""
    config = steady_config(12)
    trainer, run = one_device(config)
    full, base = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("base")
    before = set(threading.enumerate())
    train(config, str(full), run, trainer)
    train(steady_config(8), str(base), run, trainer)
    # every thread a run starts ends with it: ours (saves, their commits and deletions, the lease)
    # are joined; grain's prefetch workers end once the loader is closed. One still running at
    # interpreter exit once turned a finished run's exit code into 1. (tqdm's monitor outlives
    # bars by design and stops itself at exit.)
    deadline = time.time() + 10
    while (left := [t.name for t in set(threading.enumerate()) - before if t.name != "tqdm_monitor"]) and \
            time.time() < deadline:
        time.sleep(0.05)
    assert left == []
    return trainer, losses(full), base


def _largest(folder):
    files = [os.path.join(r, n) for r, _, names in os.walk(folder) for n in names]
    return max(files, key=os.path.getsize)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garbage(path):
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(max(os.path.getsize(path), 64)))


DAMAGE = {
    "truncated array data": lambda c: _truncate(_largest(c / "8" / "state" / "d")),
    "garbage array data": lambda c: _garbage(_largest(c / "8" / "state" / "d")),
    "deleted manifest.ocdbt": lambda c: os.remove(next((c / "8" / "state").rglob("manifest.ocdbt"))),
    "garbage _METADATA": lambda c: (c / "8" / "state" / "_METADATA").write_text("{garbage"),
    "missing state item": lambda c: shutil.rmtree(c / "8" / "state"),
    "garbage config JSON": lambda c: next((c / "8" / "config").glob("*")).write_text("{{"),
    "an empty newer folder": lambda c: (c / "20").mkdir(),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_one_before_resumes_exactly(runs, damage, tmp_path):
    trainer, want, base = runs
    work = tmp_path / "run"
    shutil.copytree(base, work)
    DAMAGE[damage](work / "checkpoints")
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 1.2')  # and a torn last line, as a crash mid-write leaves
    config = steady_config(12)
    train(config, str(work), validate(config, n_devices=1), trainer)
    assert losses(work) == want  # steps 1..12, bit for bit
    aside = sorted(os.listdir(work / "checkpoints_unreadable"))
    assert [name.split("-")[0] for name in aside] == (["20"] if damage == "an empty newer folder" else ["8"])


@pytest.mark.slow
def test_old_steps_and_what_killed_runs_left_are_deleted_and_nothing_newer(runs, tmp_path):
    """keep=1 after step 8: step 4 goes, so do an older half-deleted step and an older
    unfinished save; a newer unfinished save is not this collection's to judge."""
    shutil.copytree(runs[2] / "checkpoints", tmp_path / "checkpoints")
    folder = tmp_path / "checkpoints"
    shutil.copytree(folder / "4" / "state", folder / "2" / "state")  # a deletion killed midway
    (folder / "6.orbax-checkpoint-tmp-7").mkdir()  # a save killed midway
    (folder / "12.orbax-checkpoint-tmp-9").mkdir()
    ckpt = Checkpointer(str(folder), keep=1)
    ckpt.collect(8)
    assert sorted(os.listdir(folder)) == ["12.orbax-checkpoint-tmp-9", "8"] and ckpt.manager.all_steps() == [8]
    ckpt.collect(8)  # idempotent
    assert sorted(os.listdir(folder)) == ["12.orbax-checkpoint-tmp-9", "8"]
    ckpt.close()


@pytest.mark.slow
@pytest.mark.parametrize("iterator", ["not json", '{"next_index": 3}'])
def test_the_data_position_comes_from_the_step_so_a_damaged_or_wrong_iterator_state_is_harmless(runs, iterator,
                                                                                               tmp_path):
    trainer, want, base = runs
    work = tmp_path / "run"
    shutil.copytree(base, work)
    (work / "checkpoints" / "8" / "data" / "process_0-of-1.json").write_text(iterator)
    config = steady_config(12)
    train(config, str(work), validate(config, n_devices=1), trainer)
    assert losses(work) == want  # resumed from checkpoint 8 at loader batch 8, bit for bit
    assert not (work / "checkpoints_unreadable").exists()


def test_changes_that_change_the_run_are_refused_in_one_line_and_harmless_ones_pass():
    saved = small_config(steps=20).to_dict()
    now = small_config(steps=40).to_dict()
    now["seed"], now["model"]["d_model"], now["train"]["log_every"] = 1, 64, 5
    with pytest.raises(ResumeRefused) as e:
        check(saved, now, 8, None)
    message = str(e.value)
    assert "\n" not in message and "model.d_model 32 -> 64, seed 0 -> 1" in message
    assert message.endswith("--config.ckpt.allow_changes=model.d_model,seed")
    assert "train.steps" not in message and "train.log_every" not in message  # harmless: logged only
    assert check(saved, now, 8, "seed,model.d_model") is None
    bigger = small_config(steps=20).to_dict()
    bigger["train"]["batch_size"] = 24  # 8 steps x 8 sequences read: resume at batch ceil(64 / 24) = 3
    assert check(saved, bigger, 8, "train.batch_size") == 3


@pytest.mark.slow
def test_a_refused_resume_touches_nothing_and_an_accepted_batch_change_resumes_at_the_right_window(runs, tmp_path):
    trainer, _, base = runs
    work = tmp_path / "run"
    shutil.copytree(base, work)
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*")}
    changed = steady_config(12)
    changed.seed = 1
    with pytest.raises(ResumeRefused, match="seed 0 -> 1"):
        train(changed, str(work), validate(changed), Trainer(changed, validate(changed)))
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*")} == before  # nothing moved aside or written

    # Batch 8 -> 16, accepted: checkpoint 8 has read 64 sequences, so the loader resumes at
    # batch 4 of 16, the windows right after them.
    bigger = steady_config(12)
    bigger.train.batch_size = 16
    bigger.ckpt.allow_changes = "train.batch_size"
    run = validate(bigger)
    trainer16 = Trainer(bigger, run)
    split, _ = dataset.open_splits(bigger.data, run.tokenizer)
    loader = dataset.train_loader(split, bigger.data, run.model.seq_len, 16, bigger.seed)
    it = iter(loader)
    with trainer16.context():
        from parcae_jax.runtime.checkpoint import abstract_with_shardings

        target = abstract_with_shardings(trainer16.abstract, trainer16.state_sharding)
        step, _ = Checkpointer(str(work / "checkpoints"), 5).restore_newest(
            target, it, lambda saved, s: check(saved, bigger.to_dict(), s, bigger.ckpt.allow_changes))
    expected = iter(dataset.train_loader(split, bigger.data, run.model.seq_len, 16, bigger.seed))
    for _ in range(4):
        next(expected)
    assert step == 8
    np.testing.assert_array_equal(next(it)["inputs"], next(expected)["inputs"])
    train(bigger, str(work), run, trainer16)
    assert sorted(losses(work)) == list(range(1, 13))


@pytest.mark.slow
def test_an_update_that_makes_the_parameters_non_finite_is_skipped():
    from parcae_jax.model import build

    model = build(tiny())
    tx = optax.with_extra_args_support(optax.scale(float("inf")))  # a finite gradient; an update nothing survives
    state = init_state(model, tx, jax.random.key(0))
    step = jax.jit(make_train_step(model, tx, {}, seed=0))
    ids = np.random.default_rng(0).integers(0, 256, (2, 17)).astype(np.int32)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((2, 16), np.int32)}
    new, metrics = step(state, batch, {})
    assert bool(metrics["skipped"]) and np.isfinite(float(metrics["grad_norm"]))
    jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
    assert int(new.skipped) == 1 and int(new.step) == 1


def test_non_finite_settings_are_refused_before_anything_runs():
    for key, value in (("lr", float("inf")), ("muon_lr", float("nan")), ("b2", float("inf"))):
        config = small_config()
        config.optim[key] = value
        with pytest.raises(ConfigError, match=f"optim.{key}={value}: must be a finite number"):
            validate(config)
    config = small_config()
    config.optim.lr = 1e39  # finite in Python, inf in float32
    with pytest.raises(ConfigError, match="optim.lr"):
        validate(config)


@pytest.mark.slow
def test_a_run_that_only_skips_stops_with_exit_3_and_keeps_its_checkpoint(tmp_path):
    proc = run_main(tmp_path, "--config.optim.lr=1e6", "--config.optim.muon_lr=1e6", "--config.ckpt.every=2",
                    "--config.train.max_consecutive_skips=3")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: 3 steps in a row up to step") and "lower optim.lr" in last, last
    kept = Checkpointer(str(tmp_path / "checkpoints"), 5)
    assert kept.latest_step() is not None
    assert max(losses(tmp_path)) < 20


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB filesystem (tmpfs; the tests run as root, as CI does)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_run_resumes_exactly_once_there_is_room(small_disk, uninterrupted_30):
    workdir = small_disk / "run"
    proc = run_main(workdir, "--config.train.steps=30", "--config.ckpt.every=2", "--config.ckpt.keep=30")
    out, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, err[-3000:]
    assert "cannot write checkpoint" in lines[0] and "MB free" in lines[0] and "is intact" in lines[0], lines[0]
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = run_main(workdir, "--config.train.steps=30", "--config.ckpt.every=2", "--config.ckpt.keep=30")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-5000:]
    assert losses(workdir) == uninterrupted_30[0]  # checkpoints every 2 steps or every 5: the same losses
