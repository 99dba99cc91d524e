"""The loader: documents packed into fixed windows, as a random-access grain pipeline.

An epoch is one pass over the split: blocks of `docs_per_block` consecutive documents are
put in a seeded random order, their tokens concatenated, and the stream cut into windows
of seq_len + 1 tokens (inputs = window[:-1], targets = window[1:]; the last window is
padded with targets -100). Windows are then visited in a seeded random order. Every token
of every document therefore appears once per epoch, in order.

Window g of the run (epochs back to back) is a pure function of (seed, g), so iterator
state is one index and resuming gives exactly the next batch. Global batch k is windows
[k*G, (k+1)*G); process p of c reads rows [p*G/c, (p+1)*G/c) of it, so shares are
disjoint, cover every window, and the data order does not depend on the host count.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os

import numpy as np

from parcae_jax.data.readers import DataError

PAD_TARGET = -100


@dataclasses.dataclass
class TokenSplit:
    """One split of a prepared directory: shard paths and per-document token counts."""

    directory: str
    split: str
    paths: list[str]
    lengths: np.ndarray  # int64 [documents], end-of-document token included
    dtype: np.dtype
    eod_id: int
    manifest: dict


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, "manifest.json")
    if not os.path.exists(path):
        if os.path.exists(os.path.join(directory, "plan.json")):
            raise DataError(f"{directory}: preparation did not finish (no manifest.json); "
                            "re-run the same prepare command")
        raise DataError(f"{directory}: no manifest.json; make the data with python -m parcae_jax.commands.prepare")
    try:
        with open(path) as f:
            manifest = json.load(f)
        int(manifest["tokenizer"]["vocab_size"]), str(manifest["tokenizer"]["fingerprint"]), dict(manifest["splits"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a manifest prepare wrote ({type(e).__name__}: {e}); prepare the data "
                        "again") from None
    return manifest


def open_split(directory: str, split: str, fingerprint: str | None = None) -> TokenSplit:
    """Opens a prepared split, refusing data made with another tokenizer than `fingerprint`."""
    manifest = read_manifest(directory)
    made_with = manifest["tokenizer"]["fingerprint"]
    if fingerprint is not None and made_with != fingerprint:
        raise DataError(f"{directory} was tokenized with {made_with} ({manifest['tokenizer']['spec']}) "
                        f"but data.tokenizer is {fingerprint}; set data.tokenizer to the one used, "
                        "or prepare the data again")
    shards = manifest["splits"][split]["shards"]
    if not shards:
        raise DataError(f"{directory}: the {split} split holds no documents (see its split_rule / val_every)")
    paths = [os.path.join(directory, s["path"]) for s in shards]
    for p in paths:
        if not os.path.exists(p):
            raise DataError(f"{p} is missing; the prepared directory is incomplete, prepare it again")
    tables = [np.load(p + ".lengths.npy") for p in paths]
    dtype = np.dtype(manifest["token_dtype"])
    for path, table in zip(paths, tables):
        _check_shard(path, table, dtype)
    lengths = np.concatenate(tables).astype(np.int64)
    return TokenSplit(directory, split, paths, lengths, dtype, manifest["tokenizer"]["eod_id"], manifest)


def _check_shard(path: str, table: np.ndarray, dtype: np.dtype) -> None:
    """Cheap checks before training reads a shard at random: its record count (in the file's
    footer) against its length table, and its first record's size against the manifest's
    token dtype (a lying manifest would otherwise train on garbage tokens)."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path)
        records = reader.num_records()
        first = reader.read([0])[0] if records else b""
        reader.close()
    except Exception as e:  # noqa: BLE001 - a truncated or garbage shard: array_record raises RuntimeError
        raise DataError(f"{path}: not a readable shard ({str(e).splitlines()[0][:120]}); "
                        "prepare the data again") from None
    if records != len(table):
        raise DataError(f"{path} holds {records} documents but its .lengths.npy lists {len(table)}; "
                        "prepare the data again")
    if records and len(first) != int(table[0]) * dtype.itemsize:
        raise DataError(f"{path}: its first document has {len(first)} bytes, not {int(table[0])} tokens of "
                        f"{dtype.name} as manifest.json says; prepare the data again")


class PackedWindows:
    """Random-access source of packed windows over `num_epochs` epochs (a grain data source)."""

    def __init__(self, data: TokenSplit, seq_len: int, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: int = 1, docs_per_block: int = 16):
        self.data, self.W, self.seed, self.shuffle, self.num_epochs = data, seq_len + 1, seed, shuffle, num_epochs
        self.dpb = docs_per_block
        self.ends = np.cumsum(data.lengths)  # stream end of each document, in storage order
        self.total = int(self.ends[-1])
        self.windows_per_epoch = math.ceil(self.total / self.W)
        block_firsts = np.arange(0, len(data.lengths), self.dpb)
        self.block_tokens = np.add.reduceat(data.lengths, block_firsts)
        self._epochs: collections.OrderedDict = collections.OrderedDict()
        self._docs: collections.OrderedDict = collections.OrderedDict()
        self._source = None

    def __len__(self) -> int:
        return self.windows_per_epoch * self.num_epochs

    def __getstate__(self):  # grain pickles sources into worker processes: reopen files there
        return {**self.__dict__, "_source": None, "_docs": collections.OrderedDict()}

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(block order, stream start of each block in that order) for epoch e."""
        if e not in self._epochs:
            n = len(self.block_tokens)
            order = np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle else np.arange(n)
            starts = np.concatenate([[0], np.cumsum(self.block_tokens[order])[:-1]])
            self._epochs[e] = (order, starts)
            if len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def _doc(self, d: int) -> np.ndarray:
        if d not in self._docs:
            if self._source is None:
                import grain

                self._source = grain.sources.ArrayRecordDataSource(self.data.paths)
            doc = np.frombuffer(self._source[d], self.data.dtype)
            vocab = self.data.manifest["tokenizer"]["vocab_size"]
            if doc.size and int(doc.max()) >= vocab:  # a shard not written by prepare: never index past the table
                raise DataError(f"{self.data.directory}: document {d} of the {self.data.split} split holds token id "
                                f"{int(doc.max())}, but the data's tokenizer has {vocab} ids; prepare the data again")
            self._docs[d] = doc
            if len(self._docs) > 64:
                self._docs.popitem(last=False)
        return self._docs[d]

    def window_of(self, index: int) -> tuple[int, int]:
        """(epoch, window position in the epoch's stream) of run-level window `index`."""
        e, j = divmod(index, self.windows_per_epoch)
        if self.shuffle and self.windows_per_epoch > 1:
            import grain

            j = grain.experimental.index_shuffle(j, self.windows_per_epoch - 1, (self.seed * 1_000_003 + e) % 2**31, 4)
        return e, j

    def tokens(self, e: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, stop) of epoch e's stream and their document numbers (1, 2, ...)."""
        order, starts = self._epoch(e)
        pos = int(np.searchsorted(starts, start, side="right")) - 1
        pieces, segments, cur, seg = [], [], start, 0
        while cur < stop:
            first = order[pos] * self.dpb
            last = min(first + self.dpb, len(self.data.lengths))
            base = self.ends[first - 1] if first else 0  # storage-stream offset of the block
            off = cur - starts[pos] + base  # where `cur` falls in the storage stream
            d = int(np.searchsorted(self.ends[first:last], off, side="right")) + first
            while cur < stop and d < last:
                doc_start = self.ends[d - 1] if d else 0
                take = self._doc(d)[off - doc_start:][: stop - cur]
                seg += 1
                pieces.append(take)
                segments.append(np.full(len(take), seg, np.int32))
                cur += len(take)
                off += len(take)
                d += 1
            pos += 1
        return np.concatenate(pieces).astype(np.int32), np.concatenate(segments)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        e, j = self.window_of(index)
        toks, segs = self.tokens(e, j * self.W, min((j + 1) * self.W, self.total))
        L, n = self.W - 1, len(toks) - 1
        inputs = np.full(L, self.data.eod_id, np.int32)
        targets = np.full(L, PAD_TARGET, np.int32)
        segment_ids = np.zeros(L, np.int32)
        inputs[:n], targets[:n], segment_ids[:n] = toks[:-1], toks[1:], segs[:-1]
        return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids}


def rows_per_process(global_batch: int, process_count: int) -> int:
    """Each process's rows of a global batch (it loads its own)."""
    if global_batch % process_count:
        raise DataError(f"train.batch_size={global_batch} is not divisible by the {process_count} processes")
    return global_batch // process_count


class ProcessShare:
    """This process's rows of every global batch: local item i is global window
    (i // b) * G + p * b + i % b, with b = G / c rows per process."""

    def __init__(self, source, global_batch: int, process_index: int = 0, process_count: int = 1):
        self.source, self.G, self.p = source, global_batch, process_index
        self.b = rows_per_process(global_batch, process_count)

    def __len__(self) -> int:
        return (len(self.source) // self.G) * self.b

    def global_index(self, i: int) -> int:
        return (i // self.b) * self.G + self.p * self.b + i % self.b

    def __getitem__(self, i: int):
        return self.source[self.global_index(i)]


def make_loader(data: TokenSplit, seq_len: int, global_batch: int, *, seed: int = 0, shuffle: bool = True,
                num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                num_workers: int = 0, read_threads: int = 2, prefetch: int = 4):
    """A grain IterDataset of local batches {inputs, targets, segment_ids} ([G/c, seq_len] int32).

    Iterate it with `iter(...)`; the iterator's `get_state()` / `set_state()` resume on the
    exact next batch. num_epochs=None repeats (practically) forever.
    """
    import grain

    epochs = num_epochs if num_epochs is not None else 1_000_000
    windows = PackedWindows(data, seq_len, seed=seed, shuffle=shuffle, num_epochs=epochs)
    share = ProcessShare(windows, global_batch, process_index, process_count)
    if len(share) == 0:
        raise DataError(f"the {data.split} split ({windows.windows_per_epoch} windows of {seq_len + 1} tokens) is "
                        f"smaller than one global batch of {global_batch}; use more data or a smaller batch")
    ds = grain.MapDataset.source(share).batch(share.b, drop_remainder=True)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    if num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch))
    return ds


def to_global(batch: dict[str, np.ndarray], sharding) -> dict:
    """Local rows -> global jax.Arrays laid out by `sharding` (multi-process safe)."""
    import jax

    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def unigram_loss(train_tokens, val_batches: list[dict], vocab_size: int, max_tokens: int = 4_000_000) -> float:
    """Cross-entropy (nats) of the validation targets under the unigram distribution of the
    training token arrays `train_tokens` (add-one smoothed, from up to max_tokens of them): the
    loss of a model that has learnt token frequencies and nothing else."""
    counts, seen = np.ones(vocab_size), 0
    for ids in train_tokens:
        counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
        seen += len(ids)
        if seen >= max_tokens:
            break
    logp = np.log(counts / counts.sum())
    targets = np.concatenate([np.asarray(b["targets"]).ravel() for b in val_batches])
    targets = targets[targets >= 0]
    return float(-logp[targets].mean())
