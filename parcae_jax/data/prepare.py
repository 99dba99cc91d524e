"""Tokenise documents into ArrayRecord shards plus a JSON manifest.

    python -m parcae_jax.data.prepare --input=DIR_OR_FILES --output=OUT --tokenizer=bytes|tokenizer.json|x.model

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
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from typing import Iterable, Iterator

import filelock
import numpy as np

from parcae_jax.data.readers import DataError
from parcae_jax.data.staging import sha256_file
from parcae_jax.data.tokenizer import load_tokenizer

FORMAT = "parcae_jax.tokens.v1"
RECORD_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: cheap random reads
SPLITS = ("train", "validation")


def atomic_write(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    atomic_write(path, write)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.arrayrecord"


def complete_shards(output: str, split: str) -> list[str]:
    """The prefix of shards that were finished (renamed into place, lengths written)."""
    names = []
    for i in itertools.count():
        name = shard_name(split, i)
        if not (os.path.exists(os.path.join(output, name)) and os.path.exists(os.path.join(output, name + ".lengths.npy"))):
            return names
        names.append(name)


class _ShardWriter:
    def __init__(self, output: str, split: str, index: int, dtype):
        self.output, self.split, self.index, self.dtype = output, split, index, dtype
        self.writer, self.lengths = None, []

    def add(self, tokens: np.ndarray) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self.writer is None:
            self.path = os.path.join(self.output, shard_name(self.split, self.index))
            self.writer = ArrayRecordWriter(self.path + ".tmp", RECORD_OPTIONS)
        self.writer.write(tokens.astype(self.dtype).tobytes())
        self.lengths.append(len(tokens))

    def finish(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        atomic_write(self.path + ".lengths.npy", lambda tmp: np.save(open(tmp, "wb"), np.asarray(self.lengths, np.int32)))
        os.replace(self.path + ".tmp", self.path)  # the shard counts as complete from here on
        self.writer, self.lengths, self.index = None, [], self.index + 1


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
            docs_per_shard: int = 8192, val_every: int = 200, workers: int = 0, description: str = "",
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
    os.makedirs(output, exist_ok=True)
    lock = filelock.FileLock(os.path.join(output, ".prepare.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        print(f"waiting for another process preparing {output}", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        return _prepare(documents, output, tokenizer, eod_token=eod_token, docs_per_shard=docs_per_shard,
                        val_every=val_every, workers=workers, description=description, progress=progress,
                        source=source, overwrite=overwrite)
    finally:
        lock.release()


def _prepare(documents: Iterable[str], output: str, tokenizer: str, *, eod_token: str | None, docs_per_shard: int,
             val_every: int, workers: int, description: str, progress: bool, source: str, overwrite: bool) -> dict:
    tok = load_tokenizer(tokenizer, eod_token)
    plan = {"format": FORMAT, "tokenizer": {"spec": tokenizer, "fingerprint": tok.fingerprint,
                                            "vocab_size": tok.vocab_size, "eod_id": tok.eod_id},
            "token_dtype": "uint16" if tok.vocab_size <= 2**16 else "uint32",
            "docs_per_shard": docs_per_shard, "val_every": val_every, "description": description, "source": source}
    os.makedirs(output, exist_ok=True)
    manifest_path = os.path.join(output, "manifest.json")
    plan_path = os.path.join(output, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            old = json.load(f)
        same = lambda p: (p["tokenizer"]["fingerprint"], p["docs_per_shard"], p["val_every"],  # noqa: E731
                          p.get("source") or source)  # a plan from before sources were recorded: unknown
        if same(old) != same(plan) and not overwrite:
            what = "another input" if same(old)[:3] == same(plan)[:3] else "other settings (tokenizer, shard size or split)"
            raise DataError(f"{output} holds a preparation of {what}; use another --output, or --overwrite "
                            "to replace it")
        if same(old) != same(plan):
            _remove_preparation(output)
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            plan = json.load(f)
        if os.path.exists(manifest_path):
            with open(manifest_path) as f:
                return json.load(f)
    else:
        write_json(plan_path, plan)
    for name in os.listdir(output):  # leftovers of an interrupted run
        if name.endswith(".tmp"):
            os.remove(os.path.join(output, name))

    dtype = np.dtype(plan["token_dtype"])
    done = {s: complete_shards(output, s) for s in SPLITS}
    skip = {s: sum(len(np.load(os.path.join(output, n + ".lengths.npy"))) for n in done[s]) for s in SPLITS}
    writers = {s: _ShardWriter(output, s, len(done[s]), dtype) for s in SPLITS}
    seen = {s: 0 for s in SPLITS}
    stats = {"documents": 0, "bytes": 0, "tokens": 0}

    def todo() -> Iterator[tuple[str, str]]:
        for text in (d for d in documents if d):
            split = "validation" if is_validation(text, val_every) else "train"
            seen[split] += 1
            stats["documents"] += 1
            if seen[split] > skip[split]:
                stats["bytes"] += len(text.encode("utf-8"))
                yield split, text

    from tqdm import tqdm

    # On a terminal only (tqdm disable=None), and erased at the end: errors stay one line.
    bar = tqdm(unit=" docs", file=sys.stderr, disable=None if progress else True, leave=False, mininterval=1.0)
    start = time.perf_counter()
    pool = (multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer, eod_token, True))
            if workers > 0 else None)
    if pool is None:
        _init_worker(tokenizer, eod_token)
    try:
        for batch, encoded in _encoded(_batches(todo(), 64), pool, workers):
            for (split, _), ids in zip(batch, encoded):
                writers[split].add(ids)
                stats["tokens"] += len(ids)
                if len(writers[split].lengths) == docs_per_shard:
                    writers[split].finish()
            secs = time.perf_counter() - start
            bar.update(len(batch))
            bar.set_postfix_str(f"{stats['tokens'] / secs:,.0f} tok/s, {stats['bytes'] / secs / 1e6:.2f} MB/s", refresh=False)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    for w in writers.values():
        w.finish()
    if stats["documents"] == 0:
        raise DataError("the input holds no documents (every file is empty)")

    splits = {}
    for s in SPLITS:
        shards = []
        for name in complete_shards(output, s):
            lengths = np.load(os.path.join(output, name + ".lengths.npy"))
            shards.append({"path": name, "documents": int(len(lengths)), "tokens": int(lengths.sum()),
                           "sha256": sha256_file(os.path.join(output, name)),  # checked when staged from GCS
                           "lengths_sha256": sha256_file(os.path.join(output, name + ".lengths.npy"))})
        splits[s] = {"shards": shards, "documents": sum(x["documents"] for x in shards),
                     "tokens": sum(x["tokens"] for x in shards)}
    manifest = {**plan, "text_bytes_this_run": stats["bytes"], "seconds_this_run": time.perf_counter() - start,
                "split_rule": f"validation iff int.from_bytes(blake2b(utf8(text), digest_size=8), 'little') % "
                              f"{val_every} == 0" if val_every else "no validation split",
                "splits": splits}
    write_json(manifest_path, manifest)
    return manifest


def _remove_preparation(output: str) -> None:
    """Deletes what prepare wrote in `output` (and nothing else)."""
    for name in os.listdir(output):
        if name.endswith((".arrayrecord", ".lengths.npy", ".tmp")) or name in ("plan.json", "manifest.json"):
            os.remove(os.path.join(output, name))


def main(argv: list[str]) -> None:
    from absl import flags, logging

    from parcae_jax import storage
    from parcae_jax.data import readers, staging
    from parcae_jax.data.corpus import default_cache_dir

    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.WARNING)  # TFDS logs its lookups at INFO
    if len(argv) > 1:
        readers.exit_with(DataError(f"unexpected arguments {argv[1:]}"))
    try:
        docs = readers.documents_from_flags(FLAGS)
        output = FLAGS.output
        if storage.is_remote(output):  # prepared on local disk, then uploaded (manifest last)
            storage.make_dir(output)  # a missing bucket fails now, not after the work
            output = staging.local_for(output, default_cache_dir())
        tokenizer = FLAGS.tokenizer
        if storage.is_remote(tokenizer):
            tokenizer = staging.stage_file(tokenizer, default_cache_dir())
        m = prepare(docs, output, tokenizer, eod_token=FLAGS.eod_token, docs_per_shard=FLAGS.docs_per_shard,
                    val_every=FLAGS.val_every, workers=FLAGS.workers,
                    description=f"tfds:{FLAGS.tfds}/{FLAGS.tfds_split}" if FLAGS.tfds else ",".join(FLAGS.input),
                    source=readers.input_fingerprint(FLAGS), overwrite=FLAGS.overwrite)
        if output != FLAGS.output:
            staging.upload_prepared(output, FLAGS.output)
    except (DataError, storage.StorageError) as e:
        readers.exit_with(e)
    print(json.dumps({s: {k: v for k, v in m["splits"][s].items() if k != "shards"} for s in SPLITS}))


if __name__ == "__main__":
    from absl import app, flags

    from parcae_jax.data import readers

    readers.define_input_flags()
    flags.DEFINE_string("output", None, "Directory for shards and manifest.json.", required=True)
    flags.DEFINE_bool("overwrite", False, "Replace a preparation of another input or settings in --output.")
    flags.DEFINE_string("tokenizer", "bytes", "bytes | path to tokenizer.json | path to a SentencePiece .model")
    flags.DEFINE_string("eod_token", None, "End-of-document token, if not <|endoftext|> (or the SentencePiece EOS).")
    flags.DEFINE_integer("docs_per_shard", 8192, "Documents per shard.")
    flags.DEFINE_integer("val_every", 200, "Hold out about 1 in val_every documents, by a hash of their text (0: none).")
    flags.DEFINE_integer("workers", os.cpu_count() or 1, "Tokenizer worker processes (0: in this process).")
    app.run(main)
