"""Several real processes on localhost (jax.distributed, coordinator on 127.0.0.1, 4 fake CPU
devices each, gloo collectives): one run on a global 8-device mesh, preempted, killed and
resumed, against a 1-process 8-device run of the same config; and the start-up errors."""

import json
import os
import signal
import subprocess
import sys
import time

import portpicker
import pytest

from tests.conftest import COMPILE_FAST, ROOT
from tests.test_train import SMALL, losses

STEPS = 16
FLAGS = [f"--config.model.{k}={v}" for k, v in SMALL.items()] + [
    f"--config.train.steps={STEPS}", "--config.train.batch_size=8", "--config.train.log_every=1",
    "--config.train.eval_every=0", "--config.train.eval_batches=1", "--config.ckpt.every=4", "--config.ckpt.keep=10",
    "--config.optim.muon_dtype=float32"]  # float32 Muon: equal up to reduction order, see test_train


def _env(cache, devices, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    env.update(JAX_PLATFORMS="cpu", PARCAE_JAX_CACHE=str(cache), PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {COMPILE_FAST}", **extra)
    return env


def _start(workdir, cache, logs, *flags, processes=2, port=None):
    """`processes` copies of the same command (as on a pod); their output goes to logs/pN.log."""
    port = port or portpicker.pick_unused_port()
    procs = []
    for i in range(processes):
        extra = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                     JAX_PROCESS_ID=str(i)) if processes > 1 else {}
        log = open(logs / f"p{i}.log", "a")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "parcae_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}", *FLAGS,
             *flags], cwd=ROOT, env=_env(cache, 8 // processes, **extra), stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def _wait(procs, timeout):
    deadline = time.time() + timeout
    for p in procs:
        p.wait(timeout=max(deadline - time.time(), 1))
    return [p.returncode for p in procs]


def _wait_for_step(workdir, step, procs, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(workdir / "metrics.jsonl") and max(losses(workdir), default=0) >= step:
            return
        assert all(p.poll() is None for p in procs), "a process exited early"
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


def _tail(path, n=1):
    return [line for line in path.read_text().splitlines() if line.strip()][-n:]


@pytest.mark.slow
@pytest.mark.long
def test_two_processes_train_like_one_and_survive_preemption_kill_and_resume(tmp_path):
    cache, logs, work, ref = tmp_path / "cache", tmp_path / "logs", tmp_path / "run", tmp_path / "ref"
    logs.mkdir()
    try:
        # 1. Two processes, a fresh corpus cache (one prepares it, the other waits); SIGTERM to
        #    one of them: both stop after the same step, with a checkpoint, and exit 0.
        procs = _start(work, cache, logs)
        _wait_for_step(work, 3, procs)
        procs[1].send_signal(signal.SIGTERM)
        assert _wait(procs, 120) == [143, 143], (logs / "p0.log").read_text()[-3000:]  # 128 + SIGTERM
        stopped = max(losses(work))
        assert stopped < STEPS and os.path.isdir(work / "checkpoints" / str(stopped))
        for i in (0, 1):  # each process's own log file; the console is process 0's
            own = (work / "logs" / f"process_{i}.log").read_text()
            assert own.startswith(f"process {i} of 2: 4 local / 8 devices")
            assert f"after step {stopped}; checkpoint saved" in own and f"step {stopped}/{STEPS} | loss" in own
        assert "step 1/" in (logs / "p0.log").read_text() and "step 1/" not in (logs / "p1.log").read_text()
        assert len(list(cache.glob("embedded-*/manifest.json"))) == 1

        # 2. The same command resumes on two processes; SIGKILL one: the other exits non-zero
        #    within 60 s, its last line saying what happened and how to resume.
        procs = _start(work, cache, logs)
        _wait_for_step(work, stopped + 3, procs)
        procs[1].kill()
        killed_at = time.time()
        assert _wait(procs[:1], 90) != [0]
        assert time.time() - killed_at < 60
        last = _tail(logs / "p0.log")[0]
        assert last.startswith("error: process 0 of 2 died of") and "run the same command" in last, last

        # 3. One process with 8 devices resumes the 2-process run to the end.
        assert _wait(_start(work, cache, logs, processes=1), 240) == [0], (logs / "p0.log").read_text()[-3000:]

        # The uninterrupted 1-process 8-device run: every logged loss of the 2-process run,
        # and the 1-process continuation, equal it.
        assert _wait(_start(ref, cache, logs, processes=1), 240) == [0]
        got, want = losses(work), losses(ref)
        assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
        assert max(abs(got[s] - want[s]) for s in want) < 1e-5, (got, want)
    finally:
        for p in procs:
            p.kill()


def test_an_unreachable_coordinator_is_one_line_and_writes_nothing(tmp_path):
    port = portpicker.pick_unused_port()  # nothing listens there
    env = _env(tmp_path / "cache", 4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID="1")
    out = subprocess.run([sys.executable, "-m", "parcae_jax.main", f"--workdir={tmp_path / 'run'}",
                          "--config.dist.init_timeout_s=2"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: cannot reach the coordinator at 127.0.0.1:{port}")
    assert not (tmp_path / "run").exists()


def test_a_mesh_that_does_not_split_over_the_processes_is_one_line(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = _start(tmp_path / "run", tmp_path / "cache", logs, "--config.mesh.shape=(1,1,8)")
    assert _wait(procs, 120) == [2, 2]
    for i in (0, 1):
        assert _tail(logs / f"p{i}.log") == [
            "error: mesh.shape=(1, 1, 8) splits the batch over data x fsdp = 1 device groups, not a multiple of the "
            "2 processes (each process loads its own rows); use e.g. --config.mesh.shape=(-1,1,1)"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fewer_processes_than_announced_stop_at_start_up_with_one_line(tmp_path):
    """num_processes=3 but two started: both give up after init_timeout_s, saying why."""
    logs = tmp_path / "logs"
    logs.mkdir()
    port = portpicker.pick_unused_port()
    procs = []
    for i in (0, 1):
        env = _env(tmp_path / "cache", 4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="3",
                   JAX_PROCESS_ID=str(i))
        with open(logs / f"p{i}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "parcae_jax.main", f"--workdir={tmp_path / 'run'}",
                                           "--config.dist.init_timeout_s=5"], cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
    codes = _wait(procs, 120)
    assert all(c != 0 for c in codes)
    for i in (0, 1):
        last = _tail(logs / f"p{i}.log")[0]
        assert last.startswith(f"error: process {i} of 3 died of") and "while joining the run" in last, last
    assert not (tmp_path / "run").exists()


def test_concurrent_preparations_of_one_output_tokenise_once(tmp_path):
    """Two processes prepare the same output at once: one tokenises, the other waits and reads
    the manifest (each document is read once in all)."""
    script = ("import sys, json\n"
              "from parcae_jax.data.prepare import prepare\n"
              "log = sys.argv[2]\n"
              "def docs():\n"
              "    for i in range(400):\n"
              "        open(log, 'a').write(f'{i}\\n')\n"
              "        yield f'document {i} ' * 50\n"
              "print(json.dumps(prepare(docs(), sys.argv[1], docs_per_shard=50, val_every=10, progress=False)))\n")
    out, log = tmp_path / "prepared", tmp_path / "reads.log"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(out), str(log)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    manifests = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert manifests[0]["splits"] == manifests[1]["splits"]
    assert sorted(map(int, log.read_text().split())) == list(range(400))


@pytest.mark.slow
@pytest.mark.long
def test_two_processes_stream_their_files_and_resume_after_a_kill(tmp_path):
    """data.source=stream on two processes (each reads its own files): one killed with SIGKILL
    after checkpoint 4, the same command resumes to the end with the uninterrupted run's
    losses; resuming on one process is refused in one line (a stream's position is per process)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = []
    for i in range(4):
        files.append(tmp_path / f"shard-{i}.parquet")
        texts = [f"shard {i} document {j}: " + "the loop state decays " * (j % 5 + 1) for j in range(40)]
        pq.write_table(pa.table({"text": texts}), files[-1], row_group_size=16)
    stream = ["--config.data.source=stream", f"--config.data.path={tmp_path}/shard-*.parquet",
              f"--config.data.val_path={files[0]}", "--config.train.steps=8", "--config.ckpt.every=2",
              "--config.train.eval_every=4"]
    cache, logs, work, ref = tmp_path / "cache", tmp_path / "logs", tmp_path / "run", tmp_path / "ref"
    logs.mkdir()
    procs = []
    try:
        assert _wait(_start(ref, cache, logs, *stream), 240) == [0, 0], (logs / "p0.log").read_text()[-3000:]
        procs = _start(work, cache, logs, *stream)
        _wait_for_step(work, 5, procs)
        procs[1].kill()
        assert _wait(procs[:1], 90) != [0]
        assert _wait(_start(work, cache, logs, *stream), 240) == [0, 0], (logs / "p0.log").read_text()[-3000:]
        got, want = losses(work), losses(ref)
        assert sorted(want) == list(range(1, 9)) and got == want, (got, want)
        one = _start(work, cache, logs, *stream, "--config.train.steps=10", processes=1)
        assert _wait(one, 240) == [2]
        last = _tail(logs / "p0.log")[0]
        assert last.startswith("error: checkpoint 8 holds the stream positions of 2 processes, not 1"), last
    finally:
        for p in procs:
            p.kill()
