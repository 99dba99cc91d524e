"""A watcher for multi-process runs: one clear line when the training process dies of a signal.

When one process of a multi-process run dies (SIGKILL, out of memory, a lost host), the
others learn it inside a collective (gloo on CPU aborts with "Is there a distributed
collective mismatch in your code?") or from the coordination service's heartbeat, and JAX's
C++ runtime aborts them with a stack dump. No Python runs after such an abort, so in a
multi-process run `main` starts the real training process as a child of this small parent,
which forwards SIGTERM / SIGINT to it and, when it dies of a signal, says what that most
likely means and how to resume. The child writes the phase it is in (connecting, running)
to a file the parent names, so start-up failures and failures mid-run read differently.
The child is killed with its parent (PR_SET_PDEATHSIG), so killing the command kills the run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile

PHASE_FILE = "PARCAE_JAX_PHASE_FILE"  # set in the child's environment


def is_child() -> bool:
    return PHASE_FILE in os.environ


def set_phase(phase: str) -> None:
    """Records what the training process is doing (for the parent's message if it dies)."""
    path = os.environ.get(PHASE_FILE)
    if path:
        with open(path, "w") as f:
            f.write(phase)


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the parent dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def explain(returncode: int, phase: str, who: str) -> str | None:
    """The one line for a child that died of a signal (None when it exited by itself)."""
    if returncode >= 0:
        return None
    name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else str(-returncode)
    if phase == "connecting":
        return (f"error: {who} died of {name} while joining the run (jax.distributed start-up): check that every "
                "process runs the same command, that config.dist.num_processes matches the processes started, "
                "and that the coordinator is reachable")
    if name == "SIGKILL":
        return (f"error: {who} was killed (SIGKILL; often the kernel's out-of-memory killer); every saved "
                "checkpoint is intact: run the same command on every host to resume")
    return (f"error: {who} died of {name} in phase {phase or 'start-up'}; in a run of several processes this most "
            "often means another process stopped (killed, out of memory, preempted, its host lost) and broke the "
            "collective this one was in: see the other processes' logs. Every saved checkpoint is intact: run the "
            "same command on every host to resume")


def run_child(argv: list[str], who: str) -> int:
    """Runs `python -m parcae_jax.main argv...` as a watched child; returns the exit code for this process."""
    fd, phase_path = tempfile.mkstemp(prefix="parcae_jax_phase_")
    os.close(fd)
    child = subprocess.Popen([sys.executable, "-m", "parcae_jax.main", *argv],
                             env={**os.environ, PHASE_FILE: phase_path},
                             preexec_fn=_die_with_parent, process_group=0)  # Ctrl-C reaches it once, through us
    forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        returncode = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        with open(phase_path) as f:
            phase = f.read().strip()
        os.remove(phase_path)
    line = explain(returncode, phase, who)
    if line:
        print(line, file=sys.stderr, flush=True)
        return 128 - returncode
    return returncode
