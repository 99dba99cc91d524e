"""One trainer per workdir: the lock a run holds while it writes checkpoints and metrics.

Two trainers on one workdir interleave their metrics and overwrite each other's
checkpoints, and both exit 0. So a run takes the workdir's lock before it reads a checkpoint
and holds it to the end; a second trainer meets it and stops with one line naming the holder.

- **Local workdir:** an exclusive `fcntl.flock` on the workdir folder itself (nothing is
  written, so a refused run changes nothing). The kernel releases it when the holder exits,
  however it exits (SIGKILL included), so a killed trainer never leaves it stuck.
- **gs:// workdir:** GCS has no locks that die with a process, so the lock is an object
  holding its owner and a lease end, created only if absent and renewed only if unchanged
  (both conditional on the object's generation, through tensorstore), every third of the
  lease by a background thread. A run that finds the lock takes it over when the lease has
  ended, or at once when the holder is a process of this host that no longer exists (a
  killed run resumed on the same machine); otherwise it stops, saying when the lease ends.
  A holder whose renewal finds the object changed has lost the workdir: the training loop
  checks `held()` and stops before writing anything more. Each write is also read back, so
  the lock holds where generation preconditions are ignored (the GCS emulator of the tests);
  on GCS the preconditions also close the window between a read and a write.

In a multi-process run only process 0 takes the lock; the others write no files of their own
outside `logs/`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from parcae_jax.runtime.run_dir import RunDir
from parcae_jax.storage import StorageError, is_remote


class WorkdirBusy(StorageError):
    """Another trainer holds the workdir (one line: who, since when, and what to do)."""


def _owner(lease_s: float) -> dict:
    return dict(host=socket.gethostname(), pid=os.getpid(), started=_start_time(os.getpid()), since=time.time(),
                lease_end=time.time() + lease_s)


def _start_time(pid) -> str | None:
    """When process `pid` started (Linux: clock ticks since boot), to tell it from a later
    process that reuses its pid; None where /proc is not there."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, ValueError, TypeError, IndexError):
        return None


def _describe(owner: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("since", 0))))
    return f"process {owner.get('pid', '?')} on {owner.get('host', '?')} (since {since})"


def _holder_alive(owner: dict) -> bool:
    """Whether the owner record's process (of this host) still runs: its pid exists and, where
    both are known, started when the record says (a reused pid is another process)."""
    pid = owner.get("pid")
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # someone else's process, or an owner record we cannot read: assume alive
    started, now = owner.get("started"), _start_time(pid)
    return started is None or now is None or started == now


class WorkdirLock:
    """`with WorkdirLock(workdir): ...` holds the workdir's lock for the block (or raises
    WorkdirBusy at entry). `held()` is False once a gs:// lease was lost."""

    def __init__(self, workdir: str, lease_s: float = 60.0):
        self.path = RunDir(workdir).lock
        self.remote = is_remote(self.path)
        self.lease_s = float(lease_s)
        self._fd: int | None = None  # local: the open folder the flock is on
        self._kv = self._generation = None
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "WorkdirLock":
        self._acquire_remote() if self.remote else self._acquire_local()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def held(self) -> bool:
        return not self._lost.is_set()

    # --- local: flock ---------------------------------------------------------------------------

    def _acquire_local(self) -> None:
        """An exclusive flock on the workdir folder itself: nothing is written into the workdir,
        so a refused run leaves it exactly as it was."""
        import fcntl

        folder = self.path.parent
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise StorageError(f"{folder}: cannot open the workdir to lock it ({e.strerror}); check its "
                               "permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _local_holder(fd)
            os.close(fd)
            who = f"process {holder} on this host" if holder else "a process on this host"
            raise WorkdirBusy(f"{folder} is in use by another trainer ({who}); wait for it to finish, or use "
                              "another --workdir") from None
        self._fd = fd

    # --- gs://: a leased object -----------------------------------------------------------------

    def _store(self):
        import tensorstore as ts

        spec = {"driver": "gcs", "bucket": str(self.path).split("/")[2]}
        kv = ts.KvStore.open(spec).result()
        return kv, str(self.path).split("/", 3)[3]

    def _acquire_remote(self) -> None:
        kv, key = self._store()
        current = kv.read(key).result()
        if current.state == "value":
            holder = _read_owner(current.value.decode(errors="replace"))
            mine = holder.get("host") == socket.gethostname()
            ended = float(holder.get("lease_end", 0)) < time.time()
            if not ended and not (mine and not _holder_alive(holder)):
                left = float(holder.get("lease_end", 0)) - time.time()
                raise WorkdirBusy(f"{self.path.parent} is in use by another trainer ({_describe(holder)}); wait for "
                                  f"it to finish (if it has died, its lease ends in {left:.0f} s), or use another "
                                  "--workdir")
        owner = json.dumps(_owner(self.lease_s)).encode()
        written = kv.write(key, owner, if_equal=current.stamp.generation).result()
        back = kv.read(key).result()  # where preconditions are ignored (an emulator), the read-back decides
        if not written.generation or back.value != owner:
            raise WorkdirBusy(f"{self.path.parent} was just taken by another trainer; use another --workdir")
        self._kv, self._key, self._generation = kv, key, back.stamp.generation
        self._thread = threading.Thread(target=self._renew, name="workdir-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if self._kv.read(self._key).result().stamp.generation != self._generation:
                    self._lost.set()  # someone took the lock over: stop renewing, the run stops at its next save
                    return
                owner = json.dumps(_owner(self.lease_s)).encode()
                written = self._kv.write(self._key, owner, if_equal=self._generation).result()
            except Exception:  # noqa: BLE001 - a transient error: the next renewal tries again
                continue
            if not written.generation:
                self._lost.set()
                return
            self._generation = written.generation

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if not self._lost.is_set():
                try:
                    if self._kv.read(self._key).result().stamp.generation == self._generation:
                        self._kv.write(self._key, None, if_equal=self._generation).result()
                except Exception:  # noqa: BLE001 - the lease ends by itself
                    pass


def _local_holder(fd: int) -> int | None:
    """The pid holding a flock on the folder open at fd, from Linux's /proc/locks (None elsewhere)."""
    st = os.fstat(fd)
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 5 and parts[1] == "FLOCK" and parts[3] == "WRITE":
                    major, minor, inode = parts[5].split(":")
                    if (int(major, 16), int(minor, 16), int(inode)) == want:
                        return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


def _read_owner(text: str) -> dict:
    try:
        owner = json.loads(text.strip().splitlines()[0]) if text.strip() else {}
    except json.JSONDecodeError:
        owner = {}
    return owner if isinstance(owner, dict) else {}
