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
        out = (ctypes.c_ulong * 2)()
        c.parcae_buffer_reuse_stats(out)
        return tuple(out)  # (reused, mapped)

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

    # the aligned allocators, small requests (glibc's) and a pointer of glibc's freed through us
    for p, align in ((c.aligned_alloc(4096, 40 * MB), 4096), (c.memalign(64, 48 * MB), 64)):
        assert p and p % align == 0
        c.free(p)
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

    # a forked child allocates and frees big blocks too (the lock is not inherited held)
    pid = os.fork()
    if pid == 0:
        p = big(64 * MB); fill(p, 64 * MB, 9); ok = holds(p, 64 * MB, 9); c.free(p)
        os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0

    # NumPy's big arrays: contents right when a block is handed out again
    for k in range(4):
        x = np.full(10 * MB, k, np.float32)  # 40 MiB
        assert float(x.sum()) == 10 * MB * k
        del x
    from parcae_jax.runtime import huge_pages  # what a benchmark's JSON reports
    assert huge_pages.in_force()["buffer_reuse"]
    print("ok", stats())
""")


def test_big_blocks_are_handed_out_again_and_everything_else_is_glibcs():
    env = {**os.environ, "LD_PRELOAD": str(LIBRARY)}
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]


def test_preloaded_only_where_no_other_library_is_and_not_opted_out():
    assert buffer_reuse.wanted({}) and buffer_reuse.wanted({"LD_PRELOAD": " "})
    assert not buffer_reuse.wanted({"LD_PRELOAD": "/usr/lib/libtcmalloc.so"})  # ours would pass its pointers to glibc
    assert not buffer_reuse.wanted({buffer_reuse.OPT_OUT: "0"})
    assert buffer_reuse.with_preload({"A": "1"}, LIBRARY) == {"A": "1", "LD_PRELOAD": str(LIBRARY)}
    assert buffer_reuse.library() == LIBRARY  # built once, then found in the cache
    assert not buffer_reuse.loaded() or "buffer_reuse" in os.environ.get("LD_PRELOAD", "")
