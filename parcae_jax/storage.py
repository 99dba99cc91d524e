"""Paths that may be local or in Google Cloud Storage (`gs://bucket/...`), through etils.epath
(what orbax itself uses; gs:// goes through gcsfs).

Checkpoints go to GCS directly: orbax writes arrays with tensorstore and its metadata with
epath. Files we append to (metrics.jsonl, TensorBoard events) cannot be appended to in GCS,
where an object is written whole, so for a remote workdir they are written to a local
staging folder and uploaded whole by `Mirror.sync` (at most every `interval_s`, and on
close). For tests, a local GCS emulator is reached by setting STORAGE_EMULATOR_HOST (gcsfs)
and TENSORSTORE_GCS_HTTP_URL with GOOGLE_AUTH_TOKEN_FOR_TESTING (tensorstore).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

from etils import epath

from parcae_jax.errors import UserError

REMOTE_PREFIXES = ("gs://",)


class _NoBucketTypeNotice(logging.Filter):
    """gcsfs warns on every bucket it cannot classify without credentials (an emulator) and
    then falls back to the plain client, which is all we use."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Could not determine bucket type" not in record.getMessage()


logging.getLogger("gcsfs").addFilter(_NoBucketTypeNotice())


class StorageError(UserError, OSError):
    """A path that cannot be used. The message is one line naming the path and the fix."""


def is_remote(path: str | os.PathLike) -> bool:
    return os.fspath(path).startswith(REMOTE_PREFIXES)


def resolve(path: str | os.PathLike) -> epath.Path:
    """An epath.Path: remote paths unchanged, local ones made absolute (orbax needs that)."""
    path = os.fspath(path)
    if "://" in path and not is_remote(path):
        raise StorageError(f"{path}: unsupported scheme; use a local path or gs://bucket/...")
    return epath.Path(path if is_remote(path) else os.path.abspath(path))


def make_dir(path: str | os.PathLike) -> epath.Path:
    """Creates the folder (and parents); one line if that is impossible."""
    p = resolve(path)
    if is_remote(p):  # gcsfs would create a missing bucket: refuse instead
        bucket = epath.Path("gs://" + os.fspath(p)[len("gs://"):].split("/")[0])
        if not _exists(bucket):
            raise StorageError(f"{bucket}: no such bucket, or no access to it; create it or fix the path")
    try:
        if is_remote(p) and p.is_file():
            raise FileExistsError(p)
        p.mkdir(parents=True, exist_ok=True)  # GCS folders are prefixes: nothing is written
    except FileExistsError as e:
        raise StorageError(f"{p}: exists and is not a directory; choose another path") from e
    except OSError as e:
        raise StorageError(f"{p}: cannot create it ({type(e).__name__}: {e}); check the path and permissions") from e
    if not is_remote(p):
        check_writable(p)
    return p


def check_writable(path: str | os.PathLike) -> None:
    """StorageError unless the local folder, if it exists, is a folder a file can be written in."""
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise StorageError(f"{path}: exists and is not a directory; choose another path")
    try:  # the one real test (permissions, a read-only mount, root's exemptions): make a file there
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise StorageError(f"{path}: cannot write there ({e.strerror or e}); check its permissions or choose "
                           "another path") from None


def _exists(path: epath.Path) -> bool:
    try:
        return path.exists()
    except OSError:  # gcsfs raises for a bucket it may not read
        return False


def fresh_listing(path: epath.Path) -> list[epath.Path]:
    """The folder's entries as the store holds them now (gcsfs caches listings within a
    process, and orbax writes through tensorstore, which that cache never sees)."""
    if is_remote(path):
        from etils.epath import backend

        backend.fsspec_backend.fs(os.fspath(path)).invalidate_cache()
    try:
        return list(path.iterdir())
    except FileNotFoundError:
        return []


def remove_tree(path: epath.Path, first: str | None = None) -> None:
    """Deletes a folder that may already be partly or wholly gone (a run killed while
    deleting it). `first`, if given, is a file inside removed before the rest: for a
    checkpoint, the marker that makes it count as complete."""
    if first is not None:
        try:
            (path / first).unlink(missing_ok=True)
        except FileNotFoundError:
            pass
    for _ in range(2):  # GCS: a folder placeholder object can hide the files under it from one pass
        try:
            path.rmtree(missing_ok=True)
        except FileNotFoundError:
            pass


class Mirror:
    """A local folder whose files are copied whole to a remote folder on `sync`.

    For a local target, `local` is the target itself and sync does nothing. For a remote one,
    `local` is a fresh staging folder; `fetch(name)` first brings an existing remote file
    down (to continue appending to it after a resume)."""

    def __init__(self, target: str | os.PathLike, interval_s: float = 30.0):
        self.target = resolve(target)
        self.remote = is_remote(self.target)
        self.local = epath.Path(tempfile.mkdtemp(prefix="parcae_jax_mirror_")) if self.remote else self.target
        self.interval_s = interval_s
        self._last = 0.0

    def fetch(self, name: str) -> None:
        if self.remote and (self.target / name).exists():
            (self.local / name).parent.mkdir(parents=True, exist_ok=True)
            (self.local / name).write_bytes((self.target / name).read_bytes())

    def sync(self, force: bool = False) -> None:
        if not self.remote or (not force and time.monotonic() - self._last < self.interval_s):
            return
        for root, _, files in os.walk(self.local):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), self.local)
                (self.target / rel).parent.mkdir(parents=True, exist_ok=True)
                (self.target / rel).write_bytes((self.local / rel).read_bytes())
        self._last = time.monotonic()

    def close(self) -> None:
        """A last upload, then the staging folder goes."""
        self.sync(force=True)
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
