"""Streaming input: Parquet and JSONL(.gz) files read in order, tokenised on the fly, packed
into windows, with an exact, JSON-serialisable iterator state.

The stream of process p of c is its share of the files (files p, p + c, p + 2c, ...: the
official FineWeb-Edu loader's rule), read one after another, each document tokenised with the
end-of-document id appended, all of them concatenated and cut into windows of seq_len + 1
tokens: exactly the windows of the prepared loader (pipeline.PackedWindows) over the same
documents unshuffled, with the same per-window document numbering (1, 2, ...) and the same
inputs / targets / segment_ids. Nothing is shuffled: a stream is one pass in file order (the
data is its own order; shuffle the files before sharding them if the corpus is sorted).

Built on Grain: `ParquetIterDataset` per Parquet file, a JSONL reader with a line-offset
state, `InterleaveIterDataset(cycle_length=1)` to chain the files and
`ConcatThenSplitIterDataset` to cut windows. `iterator.get_state()` is the position (file,
row, and how much of the current document the windows have taken), and `restore_state`
turns it back after a JSON round trip (Grain 0.2.18 compares a tuple that JSON turns into a
list: without the repair a resumed stream skips a document).
"""

from __future__ import annotations

import json
from typing import Callable

import numpy as np

from parcae_jax.data.pipeline import PAD_TARGET, unigram_loss
from parcae_jax.data.readers import DataError

STREAM_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")


def _jsonl_dataset(path: str, field: str):
    import grain

    class Lines(grain.DatasetIterator):
        """One JSON object per line; state: lines read and their byte count (a resumed reader
        seeks there)."""

        def __init__(self):
            super().__init__()
            self._file, self._line, self._offset = None, 0, 0

        def _open(self):
            import gzip

            if self._file is None:
                try:
                    self._file = (gzip.open if path.endswith(".gz") else open)(path, "rb")
                    if self._offset:
                        self._file.seek(self._offset)
                except OSError as e:
                    raise DataError(f"{path}: cannot read it ({e.strerror or e}); check the file") from None

        def __next__(self) -> dict:
            self._open()
            while True:
                try:
                    raw = self._file.readline()
                except (OSError, EOFError) as e:  # a truncated or corrupt .gz
                    raise DataError(f"{path}:{self._line + 1}: unreadable ({e}); the file is damaged") from None
                if not raw:
                    raise StopIteration
                self._line += 1
                self._offset += len(raw)
                if raw.strip():
                    return {"text": _text_of_line(raw, f"{path}:{self._line}", field)}

        def get_state(self) -> dict:
            return {"line": self._line, "offset": self._offset}

        def set_state(self, state: dict) -> None:
            self.close()
            self._line, self._offset = int(state["line"]), int(state["offset"])

        def close(self) -> None:
            if self._file is not None:
                self._file.close()
                self._file = None

    class JsonlFile(grain.IterDataset):
        def __iter__(self):
            return Lines()

    return JsonlFile()


def _text_of_line(raw: bytes, where: str, field: str) -> str:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not a JSON object ({e}); fix or remove the line") from None
    if not isinstance(obj, dict) or field not in obj:
        raise DataError(f"{where}: no field {field!r}; set data.text_field")
    if not isinstance(obj[field], str):
        raise DataError(f"{where}: field {field!r} is {type(obj[field]).__name__}, not text")
    return obj[field]


def _parquet_dataset(path: str, field: str):
    import grain
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:120]})") from None
    if field not in schema.names:
        raise DataError(f"{path}: no column {field!r} (columns: {schema.names[:8]}); set data.text_field")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {field!r} holds {kind}, not text")
    return grain.experimental.ParquetIterDataset(path).map(lambda row: {"text": row[field] or ""})


def file_documents(path: str, field: str = "text"):
    """A Grain IterDataset of {"text": str}, one per document of `path`, in file order."""
    if path.endswith(".parquet"):
        return _parquet_dataset(path, field)
    if path.endswith((".jsonl", ".jsonl.gz")):
        return _jsonl_dataset(path, field)
    raise DataError(f"{path}: a stream reads {', '.join(STREAM_SUFFIXES)} files")


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
                *, text_field: str = "text", process_index: int = 0, process_count: int = 1, repeat: bool = False):
    """A Grain IterDataset of local batches {inputs, targets, segment_ids} ([local_batch, seq_len]
    int32) streamed from this process's share of `files`. `encode` maps a text to its ids with
    the end-of-document id appended. Without `repeat` the stream ends with the data (the last
    partial batch is dropped; a last partial window is padded with ignored targets, as the
    prepared loader's); with it the files start again after the last, the windows running on
    across the seam."""
    import functools

    import grain

    share = process_files(files, process_index, process_count)
    L = seq_len + 1

    def tokens(doc: dict) -> dict:
        return {"tokens": np.asarray(encode(doc["text"]), np.int32)}

    paths = grain.MapDataset.source(share)
    per_file = (paths.repeat() if repeat else paths).map(lambda path: file_documents(path, text_field).map(tokens))
    docs = grain.experimental.InterleaveIterDataset(per_file, cycle_length=1)
    windows = grain.experimental.ConcatThenSplitIterDataset(docs, length_struct={"tokens": L})
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

    def _stream(self, files, seq_len, global_batch, process_index, process_count, repeat):
        if global_batch % process_count:
            raise DataError(f"train.batch_size={global_batch} is not divisible by the {process_count} processes")
        return make_stream(files, self._encode, self.tok.eod_id, seq_len, global_batch // process_count,
                           text_field=self.data.text_field, process_index=process_index,
                           process_count=process_count, repeat=repeat)

    def train_loader(self, seq_len: int, global_batch: int, seed: int, process_index: int = 0,
                     process_count: int = 1) -> StreamIterator:
        """The training stream, repeating the files; `seed` is unused (a stream is not shuffled)."""
        del seed
        return StreamIterator(self._stream(self.train_files, seq_len, global_batch, process_index, process_count,
                                           repeat=True))

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
