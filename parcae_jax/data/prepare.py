"""Tokenise documents into ArrayRecord shards plus a JSON manifest.

    python -m parcae_jax.commands.prepare --input=DIR_OR_FILES --output=OUT --tokenizer=bytes|tokenizer.json|x.model

OUT gets `{train,validation}-NNNNN.arrayrecord` (one record per document: its token ids,
ending in the end-of-document id), a `.lengths.npy` beside each shard, and, last of all,
`manifest.json`. A document is held out for validation iff the first 8 bytes of the
BLAKE2b hash of its UTF-8 text, read as a little-endian integer, are 0 modulo val_every:
about 1/val_every of the documents, and identical documents always on the same side (an
index-based rule would put duplicates, common in real corpora, in both). Each shard is written under a
temporary name and renamed when complete, so an interrupted run leaves no shard that
looks complete; a re-run skips complete shards (reading, not tokenising, their
documents) and produces the same shards an uninterrupted run would.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from typing import Iterable, Iterator

import filelock
import numpy as np

from parcae_jax.data.readers import DataError
from parcae_jax.data.shards import ShardWriter, complete_shards, describe_split, write_json
from parcae_jax.data.tokenizer import load_tokenizer

FORMAT = "parcae_jax.tokens.v1"
SPLITS = ("train", "validation")
DOCS_PER_SHARD = 8192
VAL_EVERY = 200  # about 1 document in 200 is held out for validation (by a hash of its text)

_WORKER_TOKENIZER = None


def is_validation(text: str, val_every: int) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return val_every > 0 and int.from_bytes(digest, "little") % val_every == 0


def _init_worker(spec: str, eod_token: str | None, in_pool: bool = False) -> None:
    global _WORKER_TOKENIZER
    if in_pool:  # one thread per worker process: the pool is the parallelism
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = load_tokenizer(spec, eod_token)


def _encode(texts: list[str]) -> list[np.ndarray]:
    tok = _WORKER_TOKENIZER
    encoded = tok.encode_batch(texts) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    return [np.append(ids, np.int32(tok.eod_id)) for ids in encoded]


def _batches(items: Iterator, size: int) -> Iterator[list]:
    while batch := list(itertools.islice(items, size)):
        yield batch


def _encoded(batches: Iterator[list], pool, workers: int) -> Iterator[tuple[list, list]]:
    """(batch, token arrays) in input order; with a pool, a bounded number of batches ahead."""
    if pool is None:
        yield from ((b, _encode([t for _, t in b])) for b in batches)
        return
    pending: collections.deque = collections.deque()
    for b in batches:
        pending.append((b, pool.apply_async(_encode, ([t for _, t in b],))))
        if len(pending) >= 4 * workers:
            head, result = pending.popleft()
            yield head, result.get()
    while pending:
        head, result = pending.popleft()
        yield head, result.get()


def prepare(documents: Iterable[str], output: str, tokenizer: str = "bytes", *, eod_token: str | None = None,
            docs_per_shard: int = DOCS_PER_SHARD, val_every: int = VAL_EVERY, workers: int = 0, description: str = "",
            progress: bool = True, source: str = "", overwrite: bool = False) -> dict:
    """Writes (or finishes, or finds) a prepared dataset in `output`; returns its manifest.

    `source` fingerprints the input (files: paths, sizes, modification times; see
    readers.input_fingerprint): an output prepared from another input, or with other settings,
    is refused unless `overwrite`, which deletes the old preparation first.

    Several processes may ask for the same output at once (every host of a run prepares its
    cache, and hosts may share a filesystem): a lock file beside `output` lets one of them
    prepare while the others wait, then find the manifest and return it."""
    if docs_per_shard < 1 or val_every < 0:
        raise DataError("docs_per_shard must be >= 1 and val_every >= 0")
    if os.path.exists(output) and not os.path.isdir(output):
        raise DataError(f"--output={output} exists and is not a directory; choose another path")
    load_tokenizer(tokenizer, eod_token)  # a bad tokenizer is one line before anything is written
    created = not os.path.exists(output)
    os.makedirs(output, exist_ok=True)
    try:
        with _locked(output):
            return _prepare(documents, output, tokenizer, eod_token=eod_token, docs_per_shard=docs_per_shard,
                            val_every=val_every, workers=workers, description=description, progress=progress,
                            source=source, overwrite=overwrite)
    except DataError:  # bad input: a folder this call made holds nothing worth resuming (the fix changes the input)
        if created:
            shutil.rmtree(output, ignore_errors=True)
        raise


@contextlib.contextmanager
def _locked(output: str) -> Iterator[None]:
    """Holds `output`'s lock file, saying on stderr when it must wait for another process first."""
    lock = filelock.FileLock(os.path.join(output, ".prepare.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        print(f"waiting for another process preparing {output}", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _prepare(documents: Iterable[str], output: str, tokenizer: str, *, eod_token: str | None, docs_per_shard: int,
             val_every: int, workers: int, description: str, progress: bool, source: str, overwrite: bool) -> dict:
    """prepare's work, under the lock: settle the plan, write the missing shards, then the manifest."""
    plan = _plan(load_tokenizer(tokenizer, eod_token), tokenizer, docs_per_shard, val_every, description, source)
    os.makedirs(output, exist_ok=True)
    plan, manifest = _settle_plan(output, plan, overwrite)
    if manifest is not None:  # finished earlier, or by the process that held the lock before us
        return manifest
    _remove_leftovers(output)
    writers, skip = _resume_writers(output, np.dtype(plan["token_dtype"]))
    stats = {"documents": 0, "bytes": 0, "tokens": 0}
    start = _tokenise_into(writers, _unwritten(documents, val_every, skip, stats), stats, docs_per_shard,
                           tokenizer=tokenizer, eod_token=eod_token, workers=workers, progress=progress)
    for w in writers.values():
        w.finish()
    if stats["documents"] == 0:
        raise DataError("the input holds no documents (every file is empty)")
    manifest = _manifest(output, plan, stats, start, val_every)
    write_json(os.path.join(output, "manifest.json"), manifest)  # last: its presence marks the preparation done
    return manifest


def _plan(tok, tokenizer: str, docs_per_shard: int, val_every: int, description: str, source: str) -> dict:
    """The settings of this preparation, as plan.json records them (and the manifest repeats them)."""
    return {"format": FORMAT, "tokenizer": {"spec": tokenizer, "fingerprint": tok.fingerprint,
                                            "vocab_size": tok.vocab_size, "eod_id": tok.eod_id},
            "token_dtype": "uint16" if tok.vocab_size <= 2**16 else "uint32",
            "docs_per_shard": docs_per_shard, "val_every": val_every, "description": description, "source": source}


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _settle_plan(output: str, plan: dict, overwrite: bool) -> tuple[dict, dict | None]:
    """The plan to follow (the recorded one if it matches, else `plan`, recorded now) and the manifest if done."""
    plan_path, manifest_path = os.path.join(output, "plan.json"), os.path.join(output, "manifest.json")
    if os.path.exists(plan_path):
        _check_recorded(output, _read_json(plan_path), plan, overwrite)
    if not os.path.exists(plan_path):
        write_json(plan_path, plan)
        return plan, None
    plan = _read_json(plan_path)  # the recorded plan wins: a resumed run continues what it started
    return plan, _read_json(manifest_path) if os.path.exists(manifest_path) else None


def _check_recorded(output: str, old: dict, plan: dict, overwrite: bool) -> None:
    """DataError if plan.json (`old`) is of another input or other settings; under `overwrite`, removes it instead."""
    same = lambda p: (p["tokenizer"]["fingerprint"], p["docs_per_shard"], p["val_every"],  # noqa: E731
                      p.get("source") or plan["source"])  # a plan from before sources were recorded: unknown
    if same(old) != same(plan) and not overwrite:
        what = "another input" if same(old)[:3] == same(plan)[:3] else "other settings (tokenizer, shard size or split)"
        raise DataError(f"{output} holds a preparation of {what}; use another --output, or --overwrite "
                        "to replace it")
    if same(old) != same(plan):
        _remove_preparation(output)


def _remove_leftovers(output: str) -> None:
    """Deletes the temporary files of an interrupted run (a shard it was writing is redone)."""
    for name in os.listdir(output):
        if name.endswith(".tmp"):
            os.remove(os.path.join(output, name))


def _resume_writers(output: str, dtype) -> tuple[dict, dict]:
    """Per split, a writer starting after the complete shards, and how many documents those hold (to skip)."""
    done = {s: complete_shards(output, s) for s in SPLITS}
    skip = {s: sum(len(np.load(os.path.join(output, n + ".lengths.npy"))) for n in done[s]) for s in SPLITS}
    return {s: ShardWriter(output, s, len(done[s]), dtype) for s in SPLITS}, skip


def _unwritten(documents: Iterable[str], val_every: int, skip: dict, stats: dict) -> Iterator[tuple[str, str]]:
    """(split, text) of non-empty documents not in complete shards (those are read, not tokenised); counts in
    `stats`."""
    seen = {s: 0 for s in SPLITS}
    for text in (d for d in documents if d):
        split = "validation" if is_validation(text, val_every) else "train"
        seen[split] += 1
        stats["documents"] += 1
        if seen[split] > skip[split]:
            stats["bytes"] += len(text.encode("utf-8"))
            yield split, text


def _tokenise_into(writers: dict, items: Iterator[tuple[str, str]], stats: dict, docs_per_shard: int, *,
                   tokenizer: str, eod_token: str | None, workers: int, progress: bool) -> float:
    """Tokenises `items` into their splits' writers (in `workers` processes, or here if 0); returns the start time."""
    from tqdm import tqdm

    # On a terminal only (tqdm disable=None), and erased at the end: errors stay one line.
    bar = tqdm(unit=" docs", file=sys.stderr, disable=None if progress else True, leave=False, mininterval=1.0)
    start = time.perf_counter()
    pool = (multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer, eod_token, True))
            if workers > 0 else None)
    if pool is None:
        _init_worker(tokenizer, eod_token)
    try:
        for batch, encoded in _encoded(_batches(items, 64), pool, workers):
            for (split, _), ids in zip(batch, encoded):
                writers[split].add(ids)
                stats["tokens"] += len(ids)
                if len(writers[split].lengths) == docs_per_shard:
                    writers[split].finish()
            secs = time.perf_counter() - start
            bar.update(len(batch))
            bar.set_postfix_str(f"{stats['tokens'] / secs:,.0f} tok/s, {stats['bytes'] / secs / 1e6:.2f} MB/s",
                                refresh=False)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return start


def _manifest(output: str, plan: dict, stats: dict, start: float, val_every: int) -> dict:
    """The manifest of the finished shards: the plan, this run's stats, and each split's shards."""
    splits = {s: describe_split(output, s) for s in SPLITS}
    return {**plan, "text_bytes_this_run": stats["bytes"], "seconds_this_run": time.perf_counter() - start,
            "split_rule": f"validation iff int.from_bytes(blake2b(utf8(text), digest_size=8), 'little') % "
                          f"{val_every} == 0" if val_every else "no validation split",
            "splits": splits}


def _remove_preparation(output: str) -> None:
    """Deletes what prepare wrote in `output` (and nothing else)."""
    for name in os.listdir(output):
        if name.endswith((".arrayrecord", ".lengths.npy", ".tmp")) or name in ("plan.json", "manifest.json"):
            os.remove(os.path.join(output, name))


if __name__ == "__main__":  # an old command line: say where the command went instead of doing nothing
    from parcae_jax.errors import moved

    moved("parcae_jax.commands.prepare")
