"""Pod hygiene on one host: the persistent compilation cache, a profiler trace of chosen steps,
Weights & Biases in offline mode (the same run continued after a resume), the slow-host rule."""

import json
import os
import struct

import pytest

from parcae_jax.runtime.metrics import slow_hosts
from parcae_jax.training.train import train
from tests.conftest import COMPILE_FAST, ROOT
from tests.forkserver import run_module
from tests.test_train import SMALL, losses, one_device, small_config


def wandb_history(run_dir) -> tuple[str, dict[int, dict]]:
    """(run id, {step: logged values}) from an offline W&B run: its .wandb file is a LevelDB-style
    log (32 KiB blocks; records of crc32 u32, length u16, type u8) of Record protos after a
    7-byte header. Read here with the protos wandb ships, so the test needs no W&B server."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = [os.path.join(run_dir, n) for n in os.listdir(run_dir) if n.endswith(".wandb")]
    data, pos, buf, rows, run_id = open(path, "rb").read(), 7, b"", {}, None
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "run":
                run_id = record.run.run_id
            if record.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                rows[int(row["_step"])] = row
    return run_id, rows


@pytest.mark.slow
def test_profiler_trace_and_wandb_offline_follow_the_run_and_its_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = small_config(steps=6)
    config.ckpt.update(every=2)
    config.profile.update(start_step=1, steps=2)
    config.wandb.update(project="parcae-test", mode="offline")
    trainer, run = one_device(config)  # what is under test does not depend on the device count
    workdir = tmp_path / "run"
    config.train.steps = 4
    train(config, str(workdir), run, trainer)
    config.train.steps = 6
    train(config, str(workdir), run, trainer)  # resumes from step 4

    traces = list((workdir / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0  # one trace: the resumed run is past the range
    runs = sorted((workdir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    (id_a, first), (id_b, second) = wandb_history(runs[0]), wandb_history(runs[1])
    assert id_a == id_b  # the resumed run continues the same W&B run
    logged = losses(workdir)
    assert sorted(first) == [1, 2, 3, 4] and sorted(second) == [5, 6]
    assert {s: r["loss"] for s, r in {**first, **second}.items()} == logged


@pytest.mark.slow
def test_a_second_identical_run_loads_its_steps_from_the_compilation_cache(tmp_path):
    """On one CPU device: the cache is off by default on CPU (see compile_cache.py), where only
    a single device pairs cached and fresh executables safely."""
    cache = tmp_path / "xla"
    flags = [f"--config.model.{k}={v}" for k, v in SMALL.items()] + [
        "--config.train.steps=2", "--config.train.batch_size=8", "--config.train.eval_every=0",
        "--config.train.eval_batches=1", f"--config.compilation_cache_dir={cache}"]
    # JAX's compiler logs each persistent-cache hit and miss at debug level: read them, rather than
    # the folder, whose small entries come and go with the 0.1 s threshold on a busy machine.
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {COMPILE_FAST}",
           "JAX_DEBUG_LOG_MODULES": "jax._src.compiler"}
    entries, logs = [], []
    for name in ("a", "b"):
        out = run_module("parcae_jax.main", [f"--workdir={tmp_path / name}", *flags],
                             cwd=ROOT, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        entries.append(set(os.listdir(cache)))
        logs.append(out.stderr)
    assert any(e.startswith("jit_train_step-") for e in entries[0]), entries[0]
    assert entries[0] <= entries[1]
    assert "CACHE MISS for 'jit_train_step'" in logs[0]
    assert "cache hit for 'jit_train_step'" in logs[1]  # the second run loaded its step
    assert "CACHE MISS for 'jit_train_step'" not in logs[1]


def test_the_slow_host_rule():
    assert slow_hosts([0.01, 0.012, 0.011, 0.3], step_time_s=1.0) == [(3, 0.3, 0.012)]
    assert slow_hosts([0.01, 0.012, 0.011, 0.05], step_time_s=1.0) == []  # slower, but not a tenth of the step
    assert slow_hosts([0.2, 0.2], step_time_s=1.0) == []  # all equally slow: nobody waits for one host


def test_runs_that_differ_only_in_schedule_values_lower_to_one_program():
    """A sweep's points of one shape (other lengths and warm-ups) and a stability variant's
    learning rates: the same StableHLO, so the compilation cache serves them one executable."""
    from parcae_jax.bench.step import lower_only
    from parcae_jax.training.validate import validate

    texts = []
    for steps, warmup, lr in ((20, 2, 0.008), (37, 5, 0.064)):
        config = small_config(steps=steps)
        config.optim.update(warmup_steps=warmup, lr=lr, muon_lr=lr / 2)
        _, lowered = lower_only(config, validate(config))
        texts.append(lowered.as_text())
    assert texts[0] == texts[1]
