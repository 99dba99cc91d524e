"""The command layer's re-exec with glibc's huge-page tunable and the big-buffer allocator
(runtime/huge_pages.py, runtime/buffer_reuse.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from parcae_jax.runtime import buffer_reuse, huge_pages


@pytest.mark.parametrize("argv, orig, expected", [
    (["F", "--a=1"], ["python", "-m", "parcae_jax.main", "--a=1"], True),
    (["F"], ["python", "-X", "utf8", "-u", "-m", "parcae_jax.main"], True),
    (["F", "--a=1"], ["python", "-mparcae_jax.main", "--a=1"], True),
    (["F", "--a=1", "--a=1"], ["/venv/bin/python", "F", "--a=1", "--a=1"], True),  # a console script
    (["F"], ["python", "F"], True),
    # the tests' fork server: the command line is the server's, not the command's
    (["F", "--a=1"], ["python", "-c", "server code"], False),
    (["F"], ["python", "-c", "server code"], False),
    (["-c"], ["python", "-c", "from parcae_jax.main import run; run()"], False),
    # a program that runs the command for you: restarting it would lose its state
    (["F", "--a=1"], ["python", "-m", "pdb", "-m", "parcae_jax.main", "--a=1"], False),
    (["F"], ["python", "-m", "cProfile", "-o", "x", "F"], False),
    # a script read from a stream cannot be read again
    (["-"], ["python", "-"], False),
    (["/dev/stdin"], ["python", "/dev/stdin"], False),
    (["F", "a", "b", "c"], ["python", "b", "c"], False),
])
def test_a_command_reexecutes_only_the_process_started_for_it(argv, orig, expected, tmp_path):
    program = tmp_path / "program.py"
    program.write_text("")
    real = lambda words: [str(program) if w == "F" else w for w in words]  # noqa: E731
    assert huge_pages.started_for(real(argv), real(orig)) is expected


def test_the_tunable_joins_the_ones_already_set_and_is_never_added_twice():
    env = huge_pages.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "1"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + huge_pages.TUNABLE, "A": "1"}
    assert huge_pages.with_tunable({})["GLIBC_TUNABLES"] == huge_pages.TUNABLE
    assert not huge_pages.wanted(env)
    assert not huge_pages.wanted({huge_pages.OPT_OUT: "0"}) and not huge_pages.wanted({huge_pages.OPT_OUT: "off"})
    assert not huge_pages.wanted({"JAX_PLATFORMS": "tpu"})  # accelerator hosts keep their allocator


def test_a_command_process_runs_with_the_tunable_and_the_allocator_where_they_help(tmp_path):
    """A real command process: re-executed with the tunable exactly when this machine's glibc
    and THP mode make it useful, and with the big-buffer allocator where it builds, its
    arguments and pid kept; the allocator not left for child processes to inherit; each opted
    out on its own; a command another program calls in its own process, never."""
    script = tmp_path / "show.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from parcae_jax.commands import cli
        from parcae_jax.runtime import buffer_reuse
        get = os.environ.get
        show = lambda a: print(os.getpid(), get("GLIBC_TUNABLES"), buffer_reuse.loaded(), get("LD_PRELOAD"), a[1:])
        cli.run(show, __name__)
    """))
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", huge_pages.OPT_OUT, buffer_reuse.OPT_OUT)}

    def shown(program, extra=None) -> list[str]:
        out = subprocess.run([sys.executable, str(program)], env={**env, **(extra or {})},
                             capture_output=True, text=True, check=True, timeout=120).stdout
        return out.split(" ", 4)[1:4]  # tunable, allocator loaded, LD_PRELOAD

    code = "import subprocess, sys; p = subprocess.Popen(sys.argv[1:]); print(p.pid, flush=True); p.wait()"
    out = subprocess.run([sys.executable, "-c", code, sys.executable, str(script), "word"], env=env,
                         capture_output=True, text=True, check=True, timeout=120).stdout.split("\n")
    pid, (child_pid, tunable, loaded, preload, args) = out[0], out[1].split(" ", 4)
    assert child_pid == pid and args == "['word']"  # the same process, the same arguments
    tunable_wanted = huge_pages.wanted(env)
    allocator_wanted = huge_pages.cpu_host(env) and buffer_reuse.library() is not None
    assert tunable == (huge_pages.TUNABLE if tunable_wanted else "None")
    assert loaded == str(allocator_wanted) and preload == "None"
    assert shown(script, {buffer_reuse.OPT_OUT: "0"}) == [tunable, "False", "None"]
    assert shown(script, {huge_pages.OPT_OUT: "0"}) == ["None", str(allocator_wanted), "None"]
    # another program calling a command's run() in its own process is never re-executed
    caller = tmp_path / "caller.py"
    caller.write_text(script.read_text().replace("cli.run(show, __name__)", "cli.run(show, 'parcae_jax.some_command')"))
    assert shown(caller) == ["None", "False", "None"]
