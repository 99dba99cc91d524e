"""The big-buffer allocator (runtime/buffer_reuse.c), preloaded into a real Python process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from parcae_jax.runtime import buffer_reuse

LIBRARY = buffer_reuse.library()
pytestmark = pytest.mark.skipif(LIBRARY is None, reason="no C compiler or not Linux with glibc")

# Runs under LD_PRELOAD; every check is an assert, so a wrong block, lost contents or a crash
# makes the process fail.
PROGRAM = textwrap.dedent("""
    import ctypes, os, threading
    import numpy as np
    c = ctypes.CDLL(None)
    for name in ("malloc", "realloc", "aligned_alloc", "memalign"):
        getattr(c, name).restype = ctypes.c_void_p
    c.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    c.free.argtypes = c.malloc_usable_size.argtypes = [ctypes.c_void_p]
    c.malloc_usable_size.restype = ctypes.c_size_t
    MB = 1 << 20

    def stats():
        out = (ctypes.c_ulong * 3)()
        c.parcae_buffer_reuse_stats(out)
        return tuple(out[:2])  # (reused, mapped)

    def idle():
        out = (ctypes.c_ulong * 3)()
        c.parcae_buffer_reuse_stats(out)
        return out[2]

    def big(n, align=64):
        p = ctypes.c_void_p()
        assert c.posix_memalign(ctypes.byref(p), ctypes.c_size_t(align), ctypes.c_size_t(n)) == 0
        return p.value

    def fill(p, n, byte):
        ctypes.memset(p, byte, 4096)
        ctypes.memset(p + n - 4096, byte, 4096)

    def holds(p, n, byte):
        want = bytes([byte]) * 4096
        return ctypes.string_at(p, 4096) == want and ctypes.string_at(p + n - 4096, 4096) == want

    reused, mapped = stats()
    a = big(64 * MB); fill(a, 64 * MB, 1)
    assert a % (2 * MB) == 0 and c.malloc_usable_size(a) >= 64 * MB
    c.free(a)
    b = big(60 * MB)  # fits the idle 64 MiB block (at most a quarter larger): the same block
    assert b == a and stats() == (reused + 1, mapped + 1), (hex(a), hex(b), stats())
    d = big(64 * MB)  # the first is in use: a new one
    assert d != b and stats() == (reused + 1, mapped + 2)
    c.free(b)
    e = big(200 * MB)  # far bigger than any idle block: never one of them
    assert e not in (a, d) and stats() == (reused + 1, mapped + 3)
    c.free(d); c.free(e)

    # realloc keeps the contents; shrinking to half or more keeps the block
    q = c.malloc(40 * MB); ctypes.memset(q, 7, 40 * MB)
    q2 = c.realloc(q, 100 * MB)
    assert ctypes.string_at(q2, 40 * MB) == bytes([7]) * (40 * MB)
    assert c.realloc(q2, 80 * MB) == q2
    small = c.realloc(q2, 1000)
    assert ctypes.string_at(small, 1000) == bytes([7]) * 1000
    c.free(small)
    assert c.realloc(c.malloc(40 * MB), 0) is None  # as glibc: freed, NULL

    # the aligned allocators, small requests (glibc's) and a pointer of glibc's freed through us
    before = stats()
    for p, align in ((c.aligned_alloc(4096, 40 * MB), 4096), (c.memalign(64, 48 * MB), 64)):
        assert p and p % align == 0
        c.free(p)
    assert stats() != before  # ours served them
    tiny = c.malloc(100); ctypes.memset(tiny, 3, 100); c.free(tiny)

    # switched off, glibc serves a big request: no block of ours is handed out or mapped
    before = stats()
    assert c.parcae_buffer_reuse_enable(0) == 1
    g = big(64 * MB); fill(g, 64 * MB, 5); assert holds(g, 64 * MB, 5); c.free(g)
    assert stats() == before and c.parcae_buffer_reuse_enable(1) == 0

    # threads allocate, fill, check and free big blocks at once (ctypes lets go of the GIL)
    errors = []
    def churn(k):
        for i in range(40):
            n = (33 + (i + k) % 8) * MB
            p = big(n); fill(p, n, k + 1)
            if not holds(p, n, k + 1):
                errors.append((k, i))
            c.free(p)
    threads = [threading.Thread(target=churn, args=(k,)) for k in range(4)]
    [t.start() for t in threads]; [t.join() for t in threads]
    assert not errors, errors

    # a forked child inherits blocks in use, not idle ones, and allocates big blocks itself
    # (the lock is not inherited held); the parent keeps its idle blocks
    live = big(64 * MB); fill(live, 64 * MB, 4)
    c.free(big(100 * MB))
    assert idle() >= 100 * MB
    pid = os.fork()
    if pid == 0:
        ok = idle() == 0 and holds(live, 64 * MB, 4)
        p = big(100 * MB); fill(p, 100 * MB, 9); ok = ok and holds(p, 100 * MB, 9); c.free(p)
        os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
    reused = stats()[0]
    again = big(100 * MB)
    assert stats()[0] == reused + 1  # the idle block came back after the fork
    fill(again, 100 * MB, 6)
    pid = os.fork()  # in use now, so a second child inherits it (the first fork's mark undone)
    if pid == 0:
        os._exit(0 if holds(again, 100 * MB, 6) else 1)
    assert os.waitpid(pid, 0)[1] == 0
    c.free(again); c.free(live)

    # NumPy's big arrays come from it too
    reused = stats()[0]
    for k in range(4):
        x = np.full(10 * MB, k, np.float32)  # 40 MiB
        assert float(x.sum()) == 10 * MB * k
        del x
    assert stats()[0] >= reused + 3
    from parcae_jax.runtime import huge_pages  # what a benchmark's JSON reports
    counts = huge_pages.in_force()["buffer_reuse"]
    assert counts["reused"] == stats()[0] and counts["mapped"] == stats()[1], counts
    print("ok", stats())
""")


def test_big_blocks_are_handed_out_again_and_everything_else_is_glibcs():
    env = {**os.environ, "LD_PRELOAD": str(LIBRARY), buffer_reuse.IDLE_MB: "4096"}
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]


# With the idle limit at 100 MiB: the least recently freed blocks are unmapped past it, and a
# block freed twice stops the process, as glibc does.
LIMITED = textwrap.dedent("""
    import ctypes, sys
    c = ctypes.CDLL(None)
    c.malloc.restype = ctypes.c_void_p
    c.free.argtypes = [ctypes.c_void_p]
    MB = 1 << 20

    def stats():
        out = (ctypes.c_ulong * 3)()
        c.parcae_buffer_reuse_stats(out)
        return tuple(out)  # (reused, mapped, idle bytes)

    a, b, d = c.malloc(40 * MB), c.malloc(60 * MB), c.malloc(80 * MB)
    c.free(a); c.free(b)
    assert stats() == (0, 3, 100 * MB), stats()
    c.free(d)  # 180 MiB idle: a and b, the least recently freed, are unmapped
    assert stats() == (0, 3, 80 * MB), stats()
    e = c.malloc(80 * MB)
    assert e == d and stats() == (1, 3, 0)
    f = c.malloc(40 * MB)  # a is gone: mapped anew
    assert stats() == (1, 4, 0)
    c.free(f); c.free(e)
    assert stats()[2] == 80 * MB  # f, freed first, went over the limit
    if sys.argv[1:] == ["twice"]:
        c.free(e)
    print("ok")
""")


def test_idle_blocks_stay_under_the_limit_and_a_double_free_aborts():
    env = {**os.environ, "LD_PRELOAD": str(LIBRARY), buffer_reuse.IDLE_MB: "100"}
    done = subprocess.run([sys.executable, "-c", LIMITED], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-c", LIMITED, "twice"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == -6 and "ok" not in done.stdout  # SIGABRT


def test_preloaded_only_where_no_other_library_is_and_not_opted_out():
    assert buffer_reuse.wanted({}) and buffer_reuse.wanted({"LD_PRELOAD": " "})
    assert not buffer_reuse.wanted({"LD_PRELOAD": "/usr/lib/libtcmalloc.so"})  # ours would pass its pointers to glibc
    assert not buffer_reuse.wanted({buffer_reuse.OPT_OUT: "0"})
    assert buffer_reuse.with_preload({"A": "1"}, LIBRARY) == {"A": "1", "LD_PRELOAD": str(LIBRARY)}
    assert buffer_reuse.library() == LIBRARY  # built once, then found in the cache
    env = {"LD_PRELOAD": str(LIBRARY), "A": "1"}
    buffer_reuse.forget_preload(env)  # what a command's child processes inherit
    assert env == {"A": "1"}
    for other in ("/usr/lib/libother.so", "a.so b.so"):
        env = {"LD_PRELOAD": other}
        buffer_reuse.forget_preload(env)
        assert env == {"LD_PRELOAD": other}
    env = {"LD_PRELOAD": f"a.so {LIBRARY}:b.so"}
    buffer_reuse.forget_preload(env)
    assert env == {"LD_PRELOAD": "a.so:b.so"}
