"""launch/tpu_pod.py against a simulated TPU slice, launch/slurm_gpu.sbatch against a simulated
Slurm job.

tests/fake_gcloud/gcloud records every call and runs `tpu-vm ssh --worker=all --command=CMD`
as sshd would, once per worker (two, each with its own HOME, worker id and 4 CPU devices), so
the worker scripts really run; only the cloud is fake. Most runs use a stand-in trainer
(tests/fake_gcloud/stub_trainer.py as parcae_jax/main.py of a throw-away repository) that
prints its argv and waits for SIGTERM; one test ships this repository's HEAD and trains.

`setup` runs pip for real, into a venv that already holds the pins (made with this
interpreter, plus a .pth file naming this environment's site-packages: what a first install
leaves), with `--jax-extra= --pip-args=--no-index`, so pip checks every pin offline.
"""

import base64
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile

import portpicker
import pytest

from tests.conftest import ROOT
from tests.fake_gcloud.harness import FAKES, Pod, git, stub_repository, wait_for
from tests.test_train import SMALL

POD = ["--tpu=pod1", "--zone=us-east5-a"]
SETUP = ["--jax-extra=", "--pip-args=--no-index"]
JAX_PIN = re.search(r"^jax==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)


@pytest.fixture(scope="module")
def stub_repo(tmp_path_factory) -> pathlib.Path:
    """A repository of the stand-in trainer."""
    return stub_repository(tmp_path_factory.mktemp("stub_repo"))


@pytest.fixture(scope="module")
def shared_pod(tmp_path_factory, stub_repo):
    """Two workers with the stand-in synced and set up (made once for the module)."""
    pod = Pod(tmp_path_factory.mktemp("pod"))
    for i in range(pod.workers):
        pod.reuse_this_environment(i)
    pod.launch("sync", *POD, f"--repo={stub_repo}")
    pod.launch("setup", *POD, *SETUP)
    yield pod
    pod.kill_all()


@pytest.fixture
def pod(shared_pod):
    """The shared pod with an empty gcloud record; nothing of the test left running after it."""
    shared_pod.calls()
    yield shared_pod
    shared_pod.kill_all()


@pytest.mark.slow
def test_each_subcommand_issues_the_right_gcloud_commands(pod, stub_repo):
    sha = git(stub_repo, "rev-parse", "HEAD")
    queued = ["compute", "tpus", "queued-resources"]
    pod.launch("create", *POD, "--accelerator-type=v5p-64", "--spot", "--wait", "--project=proj")
    assert pod.calls() == [
        [*queued, "create", "pod1", "--zone=us-east5-a", "--node-id=pod1", "--accelerator-type=v5p-64",
         "--runtime-version=v2-alpha-tpuv5", "--spot", "--project=proj"],
        [*queued, "describe", "pod1", "--zone=us-east5-a", "--format=value(state.state)", "--project=proj"]]

    pod.launch("sync", *POD, f"--repo={stub_repo}")
    scp, ssh = pod.calls()
    assert scp[:4] + scp[5:] == ["compute", "tpus", "tpu-vm", "scp", f"pod1:parcae_jax-{sha}.tar.gz",
                                 "--zone=us-east5-a", "--worker=all"]
    assert re.fullmatch(rf"{re.escape(tempfile.gettempdir())}/parcae_jax_sync_[^/]+/parcae_jax-{sha}\.tar\.gz", scp[4])
    assert not os.path.exists(os.path.dirname(scp[4]))  # removed after the copy
    assert_ssh_to_all(ssh, f"sha={sha}")
    out = pod.launch("setup", *POD, *SETUP).stdout
    assert_ssh_to_all(pod.calls()[0], "pip install")
    assert all(f"[worker {i}] setup:" in out for i in range(pod.workers)), out

    pod.launch("run", *POD, "configs/tiny.py", "/shared/runs/r1")
    assert_ssh_to_all(pod.calls()[0], "-m parcae_jax.main --config=configs/tiny.py --workdir=/shared/runs/r1")
    for i in range(pod.workers):
        wait_for(lambda i=i: pod.started(i, "r1"), 30, f"start on worker {i}")
    out = pod.launch("logs", *POD).stdout
    assert_ssh_to_all(pod.calls()[0], "tail -n 40")
    for i in range(pod.workers):
        assert f"[worker {i}] STARTED " in out, out
        (start,) = pod.started(i, "r1")
        assert start["argv"] == ["--config=configs/tiny.py", "--workdir=/shared/runs/r1"]
        assert start["cwd"] == str(pod.homes[i] / "parcae_jax" / sha)  # the synced commit, in its own folder
        assert start["env"]["TPU_WORKER_ID"] == str(i)

    out = pod.launch("stop", *POD, "--grace=30").stdout
    assert_ssh_to_all(pod.calls()[0], "stop_training 30")
    for i in range(pod.workers):
        assert f"[worker {i}] training stopped" in out, out
        log = (pod.homes[i] / "parcae_jax" / "logs" / f"r1.worker{i}.log").read_text()
        assert log.rstrip().endswith("SIGTERM: checkpoint saved"), log  # the trainer's SIGTERM path
        assert not (pod.homes[i] / "parcae_jax" / "train.pid").exists()

    pod.launch("delete", *POD, "--yes")
    assert pod.calls() == [[*queued, "delete", "pod1", "--zone=us-east5-a", "--force", "--quiet"]]


def assert_ssh_to_all(call: list[str], needle: str) -> None:
    """`call` is `tpu-vm ssh pod1 --worker=all` with a bash script that contains `needle`."""
    assert call[:-1] == ["compute", "tpus", "tpu-vm", "ssh", "pod1", "--zone=us-east5-a", "--worker=all"], call
    encoded = re.fullmatch(r'--command=bash -c "\$\(echo ([A-Za-z0-9+/=]+) \| base64 -d\)"', call[-1])
    assert encoded, call  # the script travels as base64: nothing in it can end the command early
    assert needle in base64.b64decode(encoded.group(1)).decode(), call


@pytest.mark.slow
def test_setup_and_sync_again_change_nothing(pod, stub_repo):
    sha = git(stub_repo, "rev-parse", "HEAD")
    out = pod.launch("setup", *POD, *SETUP).stdout
    assert "pip install" not in out and "Requirement already satisfied" not in out, out
    for i in range(pod.workers):
        assert f"[worker {i}] setup: {pod.homes[i]}/parcae_jax/venv already has these requirements" in out, out
    out = pod.launch("setup", *POD, *SETUP, "--force").stdout  # --force runs pip anyway
    assert len(re.findall(rf"\] setup: pip install -r \S+/requirements.txt jax=={JAX_PIN}$", out, re.M)) == pod.workers

    before = [sorted(p.relative_to(home) for p in (home / "parcae_jax").rglob("*")) for home in pod.homes]
    out = pod.launch("sync", *POD, f"--repo={stub_repo}").stdout
    assert out.count(f"sync: {sha} is already here, unchanged") == pod.workers, out
    for i, home in enumerate(pod.homes):
        root = home / "parcae_jax"
        assert sorted(p.relative_to(home) for p in root.rglob("*")) == before[i]
        assert {p.name for p in root.iterdir()} - {"logs"} == {sha, "current", "venv"}
        assert os.readlink(root / "current") == sha
        shipped = sorted(str(p.relative_to(root / sha)) for p in (root / sha).rglob("*") if p.is_file())
        assert shipped == sorted(git(stub_repo, "ls-files").split())  # the commit's files, nothing nested
        assert not list(home.glob("*.tar.gz"))


def test_sync_refuses_a_working_tree_with_changes_and_names_them(pod, stub_repo, tmp_path):
    repo = tmp_path / "repo"
    git(stub_repo, "clone", "-q", str(stub_repo), str(repo))
    (repo / "requirements.txt").write_text("changed\n")
    (repo / "new_config.py").write_text("")
    done = pod.launch("sync", *POD, f"--repo={repo}", check=False)
    assert done.returncode == 2 and done.stdout.count("\n") == 1, done.stdout
    assert "requirements.txt" in done.stdout and "new_config.py" in done.stdout and "--allow-dirty" in done.stdout
    assert pod.calls() == []
    done = pod.launch("sync", *POD, f"--repo={repo}", "--allow-dirty", "--dry-run")
    assert "WARNING" in done.stdout and "WITHOUT them" in done.stdout


def test_trainer_flags_arrive_intact(pod, stub_repo, tmp_path):
    pod.launch("sync", *POD, f"--repo={stub_repo}")
    marker = tmp_path / "ran"  # what a value that closed a here-document around the script would run
    flags = ["--config.mesh.shape=(-1,8,1)", "--config.data.path=/data/my corpus/shards",
             """--config.note=it's "quoted": $HOME `date` ; | & \\ * ?""", "--config.empty=", "--config.nl=a\nb",
             f"--config.x=1\nTPU_POD_SCRIPT\ntouch {marker}\n", f"--config.y=1\nGCLOUD_ARG\n)\"; touch {marker}; \""]
    pod.launch("run", *POD, "configs/tiny.py", "gs://bucket/runs/q 1", "--name=quoting",
               "--env=STUB_NOTE=a 'b' $c", "--", *flags)
    for i in range(pod.workers):
        wait_for(lambda i=i: pod.started(i, "quoting"), 30, f"start on worker {i}")
        (start,) = pod.started(i, "quoting")
        assert start["argv"] == ["--config=configs/tiny.py", "--workdir=gs://bucket/runs/q 1", *flags]
        assert start["env"]["STUB_NOTE"] == "a 'b' $c"
    assert not marker.exists()
    pod.launch("stop", *POD, "--grace=30")


@pytest.mark.slow
@pytest.mark.long
def test_run_trains_one_run_across_both_workers(pod, tmp_path):
    from parcae_jax.data.corpus import embedded_corpus

    repo = tmp_path / "repo"  # this repository's HEAD, whatever the working tree holds
    git(ROOT, "clone", "-q", "--shared", str(ROOT), str(repo))
    cache = tmp_path / "cache"
    embedded_corpus(str(cache))  # prepared once, before the workers read it
    workdir = tmp_path / "shared_workdir"
    pod.launch("sync", *POD, f"--repo={repo}")
    pod.launch("setup", *POD, *SETUP)
    port = str(portpicker.pick_unused_port())
    small = [f"--config.model.{k}={v}" for k, v in SMALL.items()]
    pod.launch("run", *POD, "configs/tiny.py", str(workdir), "--", *small, "--config.train.batch_size=8",
               "--config.train.steps=3", "--config.train.log_every=1", "--config.train.eval_every=0",
               "--config.ckpt.every=0", "--config.mesh.shape=(-1,1,1)",
               FAKE_GCLOUD_COORDINATOR_PORT=port, PARCAE_JAX_CACHE=str(cache))
    logs = [home / "parcae_jax" / "logs" / f"shared_workdir.worker{i}.log" for i, home in enumerate(pod.homes)]

    def finished():
        for home, log in zip(pod.homes, logs):
            pid = (home / "parcae_jax" / "train.pid").read_text().strip()
            assert os.path.exists(f"/proc/{pid}") or (workdir / "checkpoints" / "3").exists(), log.read_text()
        return (workdir / "checkpoints" / "3" / "commit_success.txt").exists()

    wait_for(finished, 300, "checkpoint of step 3")
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    processes = sorted(p.name for p in (workdir / "checkpoints" / "3" / "data").glob("process_*"))
    assert processes == ["process_0-of-2.json", "process_1-of-2.json"]  # one run, two processes
    for log in logs:  # 8 devices in one collective group: each of the 8 ranks sees 7 peers
        wait_for(lambda log=log: "connected to 7 peer ranks" in log.read_text(), 30, f"the device group in {log}")
    assert "step 3/3" in logs[0].read_text()
    out = pod.launch("logs", *POD, "--lines=200").stdout
    assert "[worker 0] step 3/3" in out and "[worker 1] " in out, out


@pytest.mark.slow  # its `logs` needs the run that test_run_trains_one_run_across_both_workers starts
def test_dry_run_prints_the_commands_and_runs_none(pod, stub_repo, tmp_path):
    sha = git(stub_repo, "rev-parse", "HEAD")
    commands = [["create", "--spot"], ["sync", f"--repo={stub_repo}"], ["setup", *SETUP],
                ["run", "configs/tiny.py", "gs://b/r", "--", "--config.mesh.shape=(-1,8,1)", "--x=a 'b' c"],
                ["logs"], ["stop"], ["delete"]]
    printed = {}
    for argv in commands:
        out = pod.launch("--dry-run", *argv[:1], *POD, *argv[1:]).stdout
        assert not pod.log.exists(), argv  # nothing ran
        printed[argv[0]] = out
        assert out.startswith("gcloud compute tpus "), out
    assert printed["sync"].splitlines()[0].endswith(f"pod1:parcae_jax-{sha}.tar.gz --zone=us-east5-a --worker=all")
    assert not (pathlib.Path(tempfile.gettempdir()) / f"parcae_jax-{sha}.tar.gz").exists()
    # Exactly those commands: a shell running the printed text makes the same gcloud calls.
    for argv in (["create", "--spot"], ["setup", *SETUP], ["logs"]):
        pod.launch(*argv[:1], *POD, *argv[1:])
        direct = pod.calls()
        subprocess.run(["bash", "-c", printed[argv[0]]], env=pod.env, check=True, capture_output=True)
        assert pod.calls() == direct


@pytest.mark.slow
def test_a_python_310_worker_fails_setup_with_one_line_and_no_venv(tmp_path, stub_repo):
    pod = Pod(tmp_path / "pod")
    pod.launch("sync", *POD, f"--repo={stub_repo}")
    pod.reuse_this_environment(0)
    shims = pod.homes[1] / "bin"  # worker 1: every python on PATH is a 3.10, as on older TPU VM images
    shims.mkdir()
    for name in ("python3", "python3.11", "python3.12", "python3.13"):
        (shims / name).write_text("#!/bin/sh\n# answers the version query as Python 3.10.12 would\necho 3.10.12\n")
        (shims / name).chmod(0o755)
    before = sorted(p.relative_to(pod.homes[1]) for p in pod.homes[1].rglob("*"))
    done = pod.launch("setup", *POD, *SETUP, check=False)
    assert done.returncode != 0
    errors = [line for line in done.stdout.splitlines() if "error:" in line]
    assert errors == ["[worker 1] error: worker has Python 3.10.12; parcae_jax needs >= 3.11 "
                      "(install python3.11 or pass --python=...)"], done.stdout
    assert sorted(p.relative_to(pod.homes[1]) for p in pod.homes[1].rglob("*")) == before  # nothing written
    assert not (pod.homes[1] / "parcae_jax" / "venv").exists()
    assert "[worker 0] setup: done" in done.stdout  # the healthy worker is unaffected
    done = pod.launch("setup", *POD, *SETUP, "--python=python3.11", check=False)
    assert done.returncode != 0 and "[worker 1] error: worker has Python 3.10.12" in done.stdout


def test_slurm_script_requeues_with_a_checkpoint_and_quotes_flags(stub_repo, tmp_path):
    venv = tmp_path / "venv"  # activate: this interpreter first on PATH
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f"PATH={pathlib.Path(sys.executable).parent}:$PATH\n")
    env = dict(os.environ, PATH=f"{FAKES / 'slurm'}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_JOB_NAME="parcae_jax", SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=str(stub_repo),
               PARCAE_VENV=str(venv), PARCAE_LOG_DIR=str(tmp_path / "logs"), FAKE_SLURM_LOG=str(tmp_path / "scontrol"),
               XLA_FLAGS="--xla_dump_to=/tmp/x")
    flags = ["--config.mesh.shape=(-1,8,1)", "--config.note=a b 'c' \"d\" $e"]
    job = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm_gpu.sbatch"), "configs/1p3b.py", "/shared/runs/x",
                            *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = [tmp_path / "logs" / f"parcae_jax-4242-r0-node{t}.log" for t in range(2)]
    try:
        wait_for(lambda: all(p.exists() and "STARTED" in p.read_text() for p in logs), 30, "both node tasks")
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends before the time limit
        out, _ = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode == 0, out
    assert (tmp_path / "scontrol").read_text() == "requeue 4242\n", out
    for t, log in enumerate(logs):
        lines = log.read_text().splitlines()
        start = json.loads(lines[0][8:])
        assert start["argv"] == ["--config=configs/1p3b.py", "--workdir=/shared/runs/x",
                                 "--config.model.attention_impl=cudnn", *flags]
        assert start["env"]["SLURM_PROCID"] == str(t) and start["env"]["NCCL_DEBUG"] == "WARN"
        assert start["env"]["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=true --xla_dump_to=/tmp/x"
        assert lines[-1] == "SIGTERM: checkpoint saved"  # forwarded before the requeue
    # The pinned jaxlib knows the script's XLA flags (a misspelt one aborts every node at start).
    xla_flags = start["env"]["XLA_FLAGS"].split()[0]
    check = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1)"], capture_output=True, text=True,
                           env=dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu"), timeout=120)
    assert check.returncode == 0, check.stderr
