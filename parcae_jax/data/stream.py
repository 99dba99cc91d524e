"""Streaming input: Parquet and JSONL(.gz) files read in order, tokenised on the fly (in Grain
worker processes with data.num_workers > 0), packed into windows, with an exact,
JSON-serialisable iterator state.

The stream of process p of c is its share of the files (files p, p + c, p + 2c, ...: the
official FineWeb-Edu loader's rule), read one after another, each document tokenised with the
end-of-document id appended, all of them concatenated and cut into windows of seq_len + 1
tokens: exactly the windows of the prepared loader (pipeline.PackedWindows) over the same
documents unshuffled, with the same per-window document numbering (1, 2, ...) and the same
inputs / targets / segment_ids. Nothing is shuffled: a stream is one pass in file order.

The unit of work is a chunk of a file (data/stream_files.py). Chunks are a Grain
MapDataset, read and tokenised by `mp_prefetch` workers (worker i takes chunks i, i + w, ...,
and their outputs are taken in turn, so the order stays the file order); a flat map splits
them into documents and `ConcatThenSplitIterDataset` cuts the windows. `get_state()` is the
position (chunk, document, and how much of it the windows have taken): a resumed stream
re-reads one chunk. Grain 0.2.18 compares a tuple of that state that JSON turns into a list:
`restore_state` repairs it (without, a resumed stream skips a document).
"""

from __future__ import annotations

import functools
import json
from typing import Callable

import grain
import numpy as np

from parcae_jax.data.pipeline import PAD_TARGET, rows_per_process, unigram_loss
from parcae_jax.data.readers import DataError
from parcae_jax.data.stream_files import Chunk, chunks_of, read_chunk, stream_files


def document_ids(tok, text: str) -> np.ndarray:
    """A document's ids with the end-of-document id appended, int32."""
    return np.append(np.asarray(tok.encode(text), np.int32), np.int32(tok.eod_id))


class _TokenizeChunk:
    """Chunk -> {"tokens": every document's ids end to end, "lengths": per document}: flat
    arrays, cheap to hand from a worker process (picklable: workers build it from its fields)."""

    def __init__(self, encode: Callable[[str], np.ndarray], field: str):
        self.encode, self.field = encode, field

    def __call__(self, chunk: Chunk) -> dict[str, np.ndarray]:
        ids = [np.asarray(self.encode(t), np.int32) for t in read_chunk(chunk, self.field)]
        return {"tokens": np.concatenate(ids) if ids else np.zeros(0, np.int32),
                "lengths": np.array([len(x) for x in ids], np.int64)}


class _Documents(grain.experimental.FlatMapTransform):
    max_fan_out = 1 << 30  # read by MapDataset's flat map only; the stream's flat map takes any count

    def flat_map(self, chunk: dict) -> list[dict]:
        bounds = np.cumsum(chunk["lengths"])[:-1]
        return [{"tokens": t} for t in np.split(chunk["tokens"], bounds)] if len(chunk["lengths"]) else []


def process_files(files: list[str], process_index: int, process_count: int) -> list[str]:
    """This process's share: files p, p + c, ... (DataError when it would be empty)."""
    share = files[process_index::process_count]
    if not share:
        raise DataError(f"data.path names {len(files)} stream files for {process_count} processes: each process "
                        "reads its own, so give at least as many files as processes (or split them)")
    return share


def make_stream(files: list[str], encode: Callable[[str], np.ndarray], eod_id: int, seq_len: int, local_batch: int,
                *, text_field: str = "text", process_index: int = 0, process_count: int = 1, repeat: bool = False,
                workers: int = 0):
    """A Grain IterDataset of local batches {inputs, targets, segment_ids} ([local_batch, seq_len]
    int32) streamed from this process's share of `files`. `encode` maps a text to its ids with
    the end-of-document id appended (picklable when `workers` > 0: chunks are read and
    tokenised in that many worker processes). Without `repeat` the stream ends with the data
    (the last partial batch is dropped; a last partial window is padded with ignored targets,
    as the prepared loader's); with it the files start again after the last, the windows
    running on across the seam."""
    share = process_files(files, process_index, process_count)
    chunks = grain.MapDataset.source([c for path in share for c in chunks_of(path, text_field)])
    # A few chunks in flight, not Grain's default of 500 (a FineWeb-Edu row group is ~100 MB of text)
    tokenized = (chunks.repeat() if repeat else chunks).map(_TokenizeChunk(encode, text_field)).to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if workers > 0:
        tokenized = tokenized.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
    docs = grain.experimental.FlatMapIterDataset(tokenized, _Documents())
    windows = grain.experimental.ConcatThenSplitIterDataset(docs, length_struct={"tokens": seq_len + 1})
    return windows.batch(local_batch, drop_remainder=True).map(functools.partial(_language_model_batch, eod_id))


def _language_model_batch(eod_id: int, batch: dict) -> dict[str, np.ndarray]:
    """Windows -> inputs, targets, segment_ids. A position is real where it has a next token: past
    the data's end (segment 0), and at its last token, the inputs are end-of-document ids, the
    segments 0 and the targets ignored, as in the prepared loader's last window."""
    toks, seg = batch["tokens"].astype(np.int32), batch["tokens_segment_ids"].astype(np.int32)
    real = seg[:, 1:] > 0
    return {"inputs": np.where(real, toks[:, :-1], eod_id).astype(np.int32),
            "targets": np.where(real, toks[:, 1:], PAD_TARGET).astype(np.int32),
            "segment_ids": np.where(real, seg[:, :-1], 0).astype(np.int32)}


def restore_state(state):
    """A state read back from JSON, as Grain wrote it: every `remainder_slices` entry a tuple."""
    if isinstance(state, dict):
        return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else restore_state(v))
                for k, v in state.items()}
    return [restore_state(v) for v in state] if isinstance(state, list) else state


class StreamIterator:
    """A stream's iterator as the trainer and the checkpointer use it: its state is this
    process's position as JSON bytes (Grain's checkpoint handler writes those as they are, one
    file per process), and a resumed run is positioned by that state, not by the step."""

    def __init__(self, dataset):
        self._it = iter(dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def get_state(self) -> bytes:
        return json.dumps(self._it.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self._it.set_state(restore_state(json.loads(state)))

    def start_prefetch(self) -> None:  # Grain's handler calls it after set_state
        pass

    def close(self) -> None:
        if hasattr(self._it, "close"):
            self._it.close()


class StreamData:
    """data.source=stream: training windows from data.path, evaluation windows from data.val_path,
    tokenised with `tok` as they are read (the interface of dataset.PreparedData)."""

    def __init__(self, data, tok):
        self.data, self.tok = data, tok
        self.encode = functools.partial(document_ids, tok)  # picklable: worker processes tokenise with it
        self.train_files = stream_files(data.path, "data.path")
        self.val_files = stream_files(data.val_path, "data.val_path")

    def _stream(self, files, seq_len, global_batch, process_index, process_count, repeat, workers=0):
        return make_stream(files, self.encode, self.tok.eod_id, seq_len, rows_per_process(global_batch, process_count),
                           text_field=self.data.text_field, process_index=process_index,
                           process_count=process_count, repeat=repeat, workers=workers)

    def train_loader(self, seq_len: int, global_batch: int, seed: int, process_index: int = 0,
                     process_count: int = 1) -> StreamIterator:
        """The training stream, repeating the files, read and tokenised in data.num_workers worker
        processes; `seed` is unused (a stream is not shuffled)."""
        del seed
        return StreamIterator(self._stream(self.train_files, seq_len, global_batch, process_index, process_count,
                                           repeat=True, workers=self.data.num_workers))

    def eval_batches(self, seq_len: int, global_batch: int, n: int, process_index: int = 0,
                     process_count: int = 1) -> list[dict]:
        """This process's rows of the first n global validation batches (fewer if the files hold
        fewer; none is an error). Every process reads all of data.val_path, so the evaluation
        is the same whatever the process count."""
        stream = self._stream(self.val_files, seq_len, global_batch, 0, 1, repeat=False)
        batches = [b for _, b in zip(range(n), stream)]
        if n and not batches:
            raise DataError(f"data.val_path={self.data.val_path}: its documents fill no batch of {global_batch} "
                            f"windows of {seq_len + 1} tokens; give more validation data or a smaller batch")
        rows = rows_per_process(global_batch, process_count)
        return [{k: v[process_index * rows:(process_index + 1) * rows] for k, v in b.items()} for b in batches]

    def unigram_loss(self, val_batches: list[dict], vocab_size: int) -> float:
        """Under the token frequencies of the first training files' documents (up to 4M tokens)."""
        tokenize = _TokenizeChunk(self.encode, self.data.text_field)
        chunks = (c for path in self.train_files for c in chunks_of(path, self.data.text_field))
        return unigram_loss((tokenize(c)["tokens"] for c in chunks), val_batches, vocab_size)
