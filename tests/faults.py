"""`python -m tests.faults MODULE ARGS...`: runs MODULE as `python -m` would, but dies by
SIGKILL (no handler, no cleanup: a lost machine) at a chosen moment.

PARCAE_KILL_AT="EVENT:N:WHEN" names the moment: the N-th call (1-based, counted in this
process) of EVENT, `before` it starts or `after` it returns; WHEN=`fail` makes that call
raise an I/O error instead (a store that refuses one write), and the run goes on. The events are the calls a run
makes while it saves, commits, deletes and logs, on the third-party side where it can (what
orbax, tensorstore and etils do is not ours to stub). PARCAE_TRACE=FILE appends one line per
event instead, to see a run's order of events."""

from __future__ import annotations

import errno
import functools
import importlib
import inspect
import os
import runpy
import signal
import sys
import threading

# name: (module, attribute path) of a function whose calls are counted
EVENTS = {
    "array write": ("tensorstore", "open"),  # every array of a save (and of a restore) opens a store
    "step metadata": ("orbax.checkpoint._src.metadata.checkpoint", "_MetadataStoreImpl.write"),
    "commit marker": ("orbax.checkpoint._src.path.async_path", "write_text"),  # GCS: commit_success.txt
    "delete files": ("etils.epath.gpath", "_GPath.rmtree"),  # the objects under one folder
}

_lock = threading.Lock()
_counts: dict[str, int] = {}


def _resolve(module: str, path: str):
    owner = importlib.import_module(module)
    *parents, attr = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    return owner, attr


def _counted(event: str, fn, kill: tuple[str, int, str] | None, trace: str | None):
    def arrive() -> bool:
        with _lock:
            _counts[event] = n = _counts.get(event, 0) + 1
        if trace:
            with open(trace, "a") as f:
                f.write(f"{event}:{n}\n")
        here = kill is not None and kill[0] == event and kill[1] == n
        if here and kill[2] == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        if here and kill[2] == "fail":
            raise OSError(errno.EIO, f"injected I/O error at {event} {n}")
        return here

    def leave(here: bool) -> None:
        if here:
            os.kill(os.getpid(), signal.SIGKILL)

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            here = arrive()
            out = await fn(*args, **kwargs)
            leave(here)
            return out
    else:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            here = arrive()
            out = fn(*args, **kwargs)
            leave(here)
            return out
    return wrapper


def install(spec: str | None, trace: str | None) -> None:
    kill = None
    if spec:
        event, n, when = spec.split(":")
        assert event in EVENTS and when in ("before", "after", "fail"), spec
        kill = (event, int(n), when)
    for event, (module, path) in EVENTS.items():
        owner, attr = _resolve(module, path)
        setattr(owner, attr, _counted(event, getattr(owner, attr), kill, trace))


if __name__ == "__main__":
    install(os.environ.get("PARCAE_KILL_AT"), os.environ.get("PARCAE_TRACE"))
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
