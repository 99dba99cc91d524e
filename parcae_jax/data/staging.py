"""Prepared data and tokenizers in Google Cloud Storage: staged once per host onto local disk.

The loader reads windows at random offsets in many shards, which a local disk serves well and
an object store badly, so a `gs://` data.path is copied once into the local cache
(`<cache>/staged/<hash of the path>`). Every file is checked against the sha256 that prepare
wrote into the manifest, and the copy is made under a file lock, so the processes of one host
share one copy. A complete copy carries a stamp naming the hash of the manifest it was made
from: a later run reads nothing remote but the manifest. `prepare --output=gs://...` goes the
other way: it prepares locally, then uploads every shard and, last, the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import filelock

from parcae_jax import storage  # imports nothing of ours: a leaf below data/
from parcae_jax.data.readers import DataError

STAMP = "staged.json"
_CHUNK = 16 << 20


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def local_for(remote: str, cache_dir: str) -> str:
    return os.path.join(cache_dir, "staged", hashlib.sha256(remote.rstrip("/").encode()).hexdigest()[:16])


def _download(src, dst: str, sha256: str | None) -> None:
    """src (an epath) -> dst, through a temporary name; checked against sha256 when given."""
    h = hashlib.sha256()
    with src.open("rb") as f, open(dst + ".tmp", "wb") as g:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            g.write(chunk)
    if sha256 is not None and h.hexdigest() != sha256:
        os.remove(dst + ".tmp")
        raise DataError(f"{src}: its sha256 differs from the manifest's (a changed or corrupted upload); "
                        "upload the prepared folder again")
    os.replace(dst + ".tmp", dst)


def remote_manifest(remote: str) -> tuple[dict, bytes]:
    path = storage.resolve(remote) / "manifest.json"
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"data.path={remote}: no manifest.json there ({type(e).__name__}); prepare the data with "
                        f"python -m parcae_jax.commands.prepare --output={remote}") from None
    return json.loads(raw), raw


def stage_prepared(remote: str, cache_dir: str) -> str:
    """The local copy of the prepared folder `remote` (made now if it is missing or stale)."""
    manifest, raw = remote_manifest(remote)
    digest = hashlib.sha256(raw).hexdigest()
    local = local_for(remote, cache_dir)
    os.makedirs(local, exist_ok=True)
    with filelock.FileLock(local + ".lock"):
        stamp = os.path.join(local, STAMP)
        if os.path.exists(stamp):
            with open(stamp) as f:
                if json.load(f).get("manifest_sha256") == digest:
                    return local
            os.remove(stamp)
        shards = [s for split in manifest["splits"].values() for s in split["shards"]]
        if any("sha256" not in s for s in shards):
            raise DataError(f"{remote}/manifest.json has no checksums (made by an older prepare); prepare it again, "
                            "or copy the folder to local disk and point data.path there")
        src = storage.resolve(remote)
        for s in shards:
            _download(src / s["path"], os.path.join(local, s["path"]), s["sha256"])
            _download(src / (s["path"] + ".lengths.npy"), os.path.join(local, s["path"] + ".lengths.npy"),
                      s["lengths_sha256"])
        with open(os.path.join(local, "manifest.json"), "wb") as f:
            f.write(raw)
        with open(stamp, "w") as f:
            json.dump({"source": remote, "manifest_sha256": digest}, f)
    return local


def stage_file(remote: str, cache_dir: str) -> str:
    """A local copy of one remote file (a tokenizer), named by its path and refreshed each call."""
    local = os.path.join(local_for(remote, cache_dir), os.path.basename(remote))
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with filelock.FileLock(os.path.dirname(local) + ".lock"):
        try:
            _download(storage.resolve(remote), local, None)
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"{remote}: cannot read it ({type(e).__name__}); check the path") from None
    return local


def upload_prepared(local: str, remote: str) -> None:
    """Copies a prepared folder to `remote`: shards first, the manifest last (it marks completion)."""
    dst = storage.make_dir(remote)
    names = sorted(n for n in os.listdir(local) if n.endswith((".arrayrecord", ".lengths.npy")))
    for name in [*names, "plan.json", "manifest.json"]:
        with open(os.path.join(local, name), "rb") as f, (dst / name).open("wb") as g:
            shutil.copyfileobj(f, g, _CHUNK)
