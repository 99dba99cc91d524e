"""The embedded default corpus: text that ships with Python itself, so nothing is downloaded.

Documents, in a fixed order: the English prose of `pydoc_data.topics` (the language
reference sections behind `help()`, one document per topic, sorted by name), then the
standard library's own `.py` sources (sorted by path; not site-packages, not test suites,
not `pydoc_data/topics.py`, whose prose is already in). About 12 MB on Python 3.11.
Prepared with the byte tokenizer on first use into a cache directory; about one document
in 20 is validation (prepare's content-hash rule, so the stdlib's identical files never
straddle the split).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import sysconfig
from typing import Iterator

from parcae_jax.data.prepare import prepare

VAL_EVERY = 20
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_sources() -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]) or rel.as_posix() == "pydoc_data/topics.py":
            continue
        files.append(path)
    return files


def documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]
    for path in stdlib_sources():
        try:
            yield path.read_text("utf-8")
        except UnicodeDecodeError:  # none in CPython 3.11; skipped the same way everywhere if one appears
            continue


@functools.lru_cache(maxsize=1)  # reads all 12 MB (~0.7 s); the stdlib does not change under a running process
def fingerprint() -> str:
    h = hashlib.sha256()
    for doc in documents():
        h.update(hashlib.sha256(doc.encode()).digest())
    return h.hexdigest()[:16]


def default_cache_dir() -> str:
    return os.environ.get("PARCAE_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "parcae_jax"))


def embedded_corpus(cache_dir: str | None = None, progress: bool = False) -> str:
    """The prepared directory of the embedded corpus (prepared now if it is not yet)."""
    out = os.path.join(cache_dir or default_cache_dir(), f"embedded-{fingerprint()}")
    prepare(documents(), out, "bytes", docs_per_shard=1024, val_every=VAL_EVERY, workers=0,
            description="embedded: pydoc_data.topics + Python standard library sources", progress=progress,
            source=f"embedded:{fingerprint()}")
    return out
