"""`python -m MODULE ARGS` for the tests, each run a real process of its own, without paying
the interpreter's start-up and the JAX stack's imports (~2 s of CPU) every time.

One server process per test worker imports the slow third-party packages once and forks a
child for each command: the child sets the request's working folder and environment, points
its stdin at /dev/null and stdout/stderr at files, and runs the module as `__main__` (its own
imports, flag parsing and exit code, as `python -m` would; exit handlers run). The server never
imports our modules (an entry module's flags would be defined twice) nor starts a JAX backend,
so XLA_FLAGS still take effect in each child. A request whose environment changes JAX_* or
PYTHON* settings (read when jax is imported) goes to a plain subprocess instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading

_SERVER = r'''
import atexit, json, os, runpy, sys, traceback
import absl.flags, etils.epath, flax.linen, grain, jax, ml_collections, numpy, optax, orbax.checkpoint, tokenizers
from jax._src import xla_bridge
assert not xla_bridge._backends, "the fork server must not start a JAX backend"
reply = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(os.open(req["stdout"], os.O_WRONLY | os.O_TRUNC), 1)
            os.dup2(os.open(req["stderr"], os.O_WRONLY | os.O_TRUNC), 2)
            sys.argv = [req["module"], *req["args"]]
            sys.path[0] = req["cwd"]
            try:
                runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    reply.write(json.dumps({"pid": pid}) + "\n")
    reply.flush()
    _, status = os.waitpid(pid, 0)
    reply.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
    reply.flush()
'''

_lock = threading.Lock()
_server: subprocess.Popen | None = None


def _start() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, env=dict(os.environ))
    return _server


def _forkable(env: dict) -> bool:
    keys = {k for k in set(env) | set(os.environ) if k.startswith(("JAX_", "PYTHON"))}
    return all(env.get(k) == os.environ.get(k) for k in keys)


def run_module(module: str, args, *, cwd, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """As `subprocess.run([python, -m, module, *args], cwd=cwd, env=env, capture_output=True,
    text=True, timeout=timeout)`, through the fork server where the environment allows."""
    args = [str(a) for a in args]
    env = dict(os.environ if env is None else env)
    if not _forkable(env):
        return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    with _lock, tempfile.TemporaryDirectory(prefix="forkserver_") as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        for path in (out, err):
            open(path, "w").close()
        server = _start()
        server.stdin.write(json.dumps({"module": module, "args": args, "cwd": str(cwd), "env": env,
                                       "stdout": out, "stderr": err}) + "\n")
        server.stdin.flush()
        pid = json.loads(server.stdout.readline())["pid"]
        killed = []
        timer = threading.Timer(timeout, lambda: killed.append(_kill(pid)))
        timer.start()
        try:
            line = server.stdout.readline()
        finally:
            timer.cancel()
        if not line:
            raise RuntimeError(f"the fork server died while running {module} {args}")
        code = json.loads(line)["code"]
        with open(out) as f_out, open(err) as f_err:
            result = subprocess.CompletedProcess([sys.executable, "-m", module, *args], code, f_out.read(),
                                                 f_err.read())
    if killed:
        raise subprocess.TimeoutExpired(result.args, timeout, result.stdout, result.stderr)
    return result


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
