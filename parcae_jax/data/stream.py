"""Streaming input: Parquet and JSONL(.gz) files read in order, tokenised on the fly (in Grain
worker processes with data.num_workers > 0), packed into windows, with an exact,
JSON-serialisable iterator state.

The stream of process p of c is its share of the files (files p, p + c, p + 2c, ...: the
official FineWeb-Edu loader's rule), read one after another, each document tokenised with the
end-of-document id appended, all of them concatenated and cut into windows of seq_len + 1
tokens: exactly the windows of the prepared loader (pipeline.PackedWindows) over the same
documents unshuffled, with the same per-window document numbering (1, 2, ...) and the same
inputs / targets / segment_ids. Nothing is shuffled: a stream is one pass in file order.

The unit of work is a chunk: a Parquet row group (its text column only), a byte range of a
.jsonl file (the lines that start in it) or a whole .jsonl.gz file. Chunks are a Grain
MapDataset, read and tokenised by `mp_prefetch` workers (worker i takes chunks i, i + w, ...,
and their outputs are taken in turn, so the order stays the file order); a flat map splits
them into documents and `ConcatThenSplitIterDataset` cuts the windows. `get_state()` is the
position (chunk, document, and how much of it the windows have taken): a resumed stream
re-reads one chunk. Grain 0.2.18 compares a tuple of that state that JSON turns into a list:
`restore_state` repairs it (without, a resumed stream skips a document).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import math
import os
from typing import Callable

import grain
import numpy as np

from parcae_jax.data.pipeline import PAD_TARGET, unigram_loss
from parcae_jax.data.readers import DataError

STREAM_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")
JSONL_CHUNK_BYTES = 32 << 20  # a .jsonl file is read in byte ranges of this size (a .gz whole)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A Parquet row group (`index`), or bytes [start, stop) of a JSONL file (stop -1: to the end)."""

    path: str
    index: int = 0
    start: int = 0
    stop: int = -1


def _parquet_schema_check(path: str, field: str) -> int:
    """The file's row-group count, after checking it has a text column `field`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
        schema = meta.schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:120]})") from None
    if field not in schema.names:
        raise DataError(f"{path}: no column {field!r} (columns: {schema.names[:8]}); set data.text_field")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {field!r} holds {kind}, not text")
    return meta.num_row_groups


def chunks_of(path: str, field: str = "text") -> list[Chunk]:
    """The file's chunks in order (a Parquet file's footer is read and checked)."""
    if path.endswith(".parquet"):
        return [Chunk(path, g) for g in range(_parquet_schema_check(path, field))]
    if path.endswith(".jsonl"):
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
        n = max(1, math.ceil(size / JSONL_CHUNK_BYTES))
        return [Chunk(path, i, i * JSONL_CHUNK_BYTES, min((i + 1) * JSONL_CHUNK_BYTES, size)) for i in range(n)]
    if path.endswith(".jsonl.gz"):
        return [Chunk(path)]
    raise DataError(f"{path}: a stream reads {', '.join(STREAM_SUFFIXES)} files")


def read_chunk(chunk: Chunk, field: str = "text") -> list[str]:
    """The texts of a chunk's documents, in order (DataError naming the file otherwise)."""
    path = chunk.path
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        _parquet_schema_check(path, field)  # the file may have changed, or gone, since the run began
        try:
            column = pq.ParquetFile(path).read_row_group(chunk.index, columns=[field]).column(0)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: row group {chunk.index} unreadable ({str(e).splitlines()[0][:120]}); "
                            "the file is damaged or changed") from None
        return [t or "" for t in column.to_pylist()]
    texts = []
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            if chunk.start:  # a line belongs to the range it starts in: finish the one begun before
                f.seek(chunk.start - 1)
                f.readline()
            line = 0  # counted from the file's start in its first chunk; later ones name a byte offset
            while chunk.stop < 0 or f.tell() < chunk.stop:
                line += 1
                where = f"{path}:{line}" if not chunk.start else f"{path} (the line at byte {f.tell()})"
                raw = f.readline()
                if not raw:
                    break
                if raw.strip():
                    texts.append(_text_of_line(raw, where, field))
    except (OSError, EOFError) as e:  # gone, unreadable, or a truncated or corrupt .gz
        raise DataError(f"{path}: unreadable ({e}); the file is damaged or changed") from None
    return texts


def _text_of_line(raw: bytes, where: str, field: str) -> str:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: a line is not a JSON object ({e}); fix or remove it") from None
    if not isinstance(obj, dict) or field not in obj:
        raise DataError(f"{where}: no field {field!r}; set data.text_field")
    if not isinstance(obj[field], str):
        raise DataError(f"{where}: field {field!r} is {type(obj[field]).__name__}, not text")
    return obj[field]


def check_file(path: str, field: str = "text") -> None:
    """Before training: the file opens and (Parquet) has a text column `field`, (JSONL) its first
    line has a text `field` (DataError in one line naming the file otherwise)."""
    if path.endswith(".parquet"):
        _parquet_schema_check(path, field)
        return
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = next((line for line in f if line.strip()), None)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable ({e}); check the file") from None
    if raw is not None:
        _text_of_line(raw, f"{path}:1", field)


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
        raise DataError(f"{len(files)} stream files for {process_count} processes: each process needs at least "
                        "one; give more files (or split them)")
    return share


def stream_files(spec: str | None, key: str) -> list[str]:
    """The files a comma-separated list of files, directories and glob patterns names, in
    sorted order (readers.expand_inputs); DataError naming `key` when there are none or one is
    not a Parquet / JSONL file."""
    from parcae_jax.data.readers import expand_inputs

    if not spec:
        raise DataError(f"data.source=stream needs {key}: Parquet or JSONL(.gz) files, directories or globs, "
                        "comma-separated")
    try:
        files = expand_inputs([item.strip() for item in spec.split(",") if item.strip()])
    except DataError as e:
        raise DataError(f"{key}: {str(e).removeprefix('--input=')}") from None
    other = [f for f in files if not f.endswith(STREAM_SUFFIXES)]
    if other:
        raise DataError(f"{key}: {other[0]} is not a {'/'.join(STREAM_SUFFIXES)} file; a stream reads only those "
                        "(prepare .txt files with python -m parcae_jax.commands.prepare)")
    return files


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
    tokenized = (chunks.repeat() if repeat else chunks).map(_TokenizeChunk(encode, text_field)).to_iter_dataset()
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
        self.train_files = stream_files(data.path, "data.path")
        self.val_files = stream_files(data.val_path, "data.val_path")

    def _encode(self, text: str) -> np.ndarray:
        return np.append(np.asarray(self.tok.encode(text), np.int32), np.int32(self.tok.eod_id))

    def _stream(self, files, seq_len, global_batch, process_index, process_count, repeat, workers=0):
        if global_batch % process_count:
            raise DataError(f"train.batch_size={global_batch} is not divisible by the {process_count} processes")
        return make_stream(files, self._encode, self.tok.eod_id, seq_len, global_batch // process_count,
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
        """This process's first n validation batches (fewer if the files hold fewer; none is an error)."""
        stream = self._stream(self.val_files, seq_len, global_batch, process_index, process_count, repeat=False)
        batches = [b for _, b in zip(range(n), stream)]
        if n and not batches:
            raise DataError(f"data.val_path={self.data.val_path}: its documents fill no batch of {global_batch} "
                            f"windows of {seq_len + 1} tokens; give more validation data or a smaller batch")
        return batches

    def unigram_loss(self, val_batches: list[dict], vocab_size: int) -> float:
        stream = self._stream(self.train_files, 256, 16, 0, 1, repeat=False)
        tokens = (b["inputs"][b["segment_ids"] > 0] for b in stream)
        return unigram_loss(tokens, val_batches, vocab_size)
