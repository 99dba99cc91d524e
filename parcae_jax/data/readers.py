"""Documents (strings) from .txt, .jsonl, .jsonl.gz, .parquet files or a TFDS dataset.

A `.txt` file is one document; `.jsonl(.gz)` has one JSON object per line and `.parquet`
one row per document, with the text under `text_field`. Bad input raises DataError with
one line naming the file (and line) and the fix.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import os
from typing import Iterator

from parcae_jax.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


class DataError(UserError, ValueError):
    """Bad input data or settings; the message is one line naming what and how to fix it."""


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, directories (searched recursively) and glob patterns, in a fixed (sorted) order."""
    paths: list[str] = []
    for item in inputs:
        if any(c in item for c in "*?["):
            matched = sorted(glob.glob(item, recursive=True))
            if not matched:
                raise DataError(f"--input={item}: the pattern matches no file")
            paths += [p for p in matched if os.path.isfile(p)]
        elif os.path.isdir(item):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(item) for f in fs if f.endswith(SUFFIXES))
            if not found:
                raise DataError(f"--input={item}: the directory holds no {'/'.join(SUFFIXES)} file")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise DataError(f"--input={item}: no such file or directory")
    for p in paths:
        if not p.endswith(SUFFIXES):
            raise DataError(f"{p}: unknown format; inputs must end in {', '.join(SUFFIXES)}")
    return paths


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 at byte {e.start} ({e.reason}); re-encode the input as UTF-8") from None


def _read_jsonl(path: str, field: str) -> Iterator[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(_decode(raw, where))
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(obj, dict) or field not in obj:
                keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"{where}: no field {field!r} (found {keys}); set --text_field (data.text_field)")
            if not isinstance(obj[field], str):
                raise DataError(f"{where}: field {field!r} is {type(obj[field]).__name__}, not text")
            yield obj[field]


def _read_parquet(path: str, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"{path}: no column {field!r} (columns: {names[:8]}); set --text_field (data.text_field)")
    kind = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {field!r} holds {kind}, not text")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def read_documents(paths: list[str], text_field: str = "text") -> Iterator[str]:
    for path in paths:
        if path.endswith(".txt"):
            with open(path, "rb") as f:
                yield _decode(f.read(), path)
        elif path.endswith(".parquet"):
            yield from _read_parquet(path, text_field)
        else:
            yield from _read_jsonl(path, text_field)


def read_tfds(name: str, split: str, data_dir: str | None, text_field: str = "text") -> Iterator[str]:
    """A TFDS dataset in array_record format, through `tfds.data_source` (no TensorFlow)."""
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises many types for a dataset that is not there
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"TFDS {name!r} split {split!r} in {data_dir or 'the default data_dir'}: {first}") from None
    for i in range(len(source)):
        record = source[i]
        if text_field not in record:
            raise DataError(f"TFDS {name!r}: no feature {text_field!r} (features: {sorted(record)[:8]}); "
                            "set data.text_field")
        text = record[text_field]
        yield _decode(text, f"TFDS {name!r} record {i}") if isinstance(text, bytes) else str(text)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Where documents come from: files, directories or globs (`paths`, each file's
    `text_field`), or a TFDS dataset (`tfds`, its split and data_dir) instead."""

    paths: tuple[str, ...] = ()
    text_field: str = "text"
    tfds: str | None = None
    tfds_split: str = "train"
    tfds_data_dir: str | None = None

    @property
    def description(self) -> str:
        return f"tfds:{self.tfds}/{self.tfds_split}" if self.tfds else ",".join(self.paths)


def input_fingerprint(inputs: Inputs) -> str:
    """What the inputs name, as a short hash: each file's path, size and modification time
    (cheap; a re-run over unchanged files gives the same), or the TFDS dataset."""
    if inputs.tfds:
        return f"tfds:{inputs.tfds}/{inputs.tfds_split}@{inputs.tfds_data_dir or ''}"
    h = hashlib.sha256()
    for path in expand_inputs(list(inputs.paths)):
        stat = os.stat(path)
        h.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return "files:" + h.hexdigest()[:16]


def documents(inputs: Inputs) -> Iterator[str]:
    """The documents' texts, in a fixed order."""
    if inputs.tfds:
        return read_tfds(inputs.tfds, inputs.tfds_split, inputs.tfds_data_dir, inputs.text_field)
    if not inputs.paths:
        raise DataError("no input: pass --input=FILE_OR_DIR (repeatable) or --tfds=NAME")
    return read_documents(expand_inputs(list(inputs.paths)), inputs.text_field)
