"""The files of a stream (data/stream.py): Parquet and JSONL(.gz) files, local or gs://,
found from comma-separated files, folders and globs, checked before training, and read in
chunks: a Parquet row group (its text column only: a FineWeb-Edu shard has a dozen columns),
a byte range of a .jsonl file (the lines that start in it), or a whole .jsonl.gz file. Every
failure is a DataError of one line naming the file (and the line or row group)."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import math
import os
from typing import Iterator

from parcae_jax.data.readers import DataError

STREAM_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")


JSONL_CHUNK_BYTES = 32 << 20  # a .jsonl file is read in byte ranges of this size (a .gz whole)


@contextlib.contextmanager
def _open(path: str) -> Iterator:
    """A binary file: local, or gs:// through etils.epath (gcsfs); a .gz one decompressed."""
    from parcae_jax import storage

    with (storage.resolve(path).open("rb") if storage.is_remote(path) else open(path, "rb")) as raw:
        if not path.endswith(".gz"):
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as f:
            yield f


def _size(path: str) -> int:
    from parcae_jax import storage

    return storage.resolve(path).stat().length if storage.is_remote(path) else os.path.getsize(path)


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
        with _open(path) as f:
            meta = pq.ParquetFile(f)
            schema, groups = meta.schema_arrow, meta.num_row_groups
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:120]})") from None
    if field not in schema.names:
        raise DataError(f"{path}: no column {field!r} (columns: {schema.names[:8]}); set data.text_field")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {field!r} holds {kind}, not text")
    return groups


def chunks_of(path: str, field: str = "text") -> list[Chunk]:
    """The file's chunks in order (a Parquet file's footer is read and checked)."""
    if path.endswith(".parquet"):
        return [Chunk(path, g) for g in range(_parquet_schema_check(path, field))]
    if path.endswith(".jsonl"):
        try:
            size = _size(path)
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
            with _open(path) as f:
                column = pq.ParquetFile(f).read_row_group(chunk.index, columns=[field]).column(0)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: row group {chunk.index} unreadable ({str(e).splitlines()[0][:120]}); "
                            "the file is damaged or changed") from None
        return [t or "" for t in column.to_pylist()]
    texts = []
    try:
        with _open(path) as f:
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
        with _open(path) as f:
            raw = next((line for line in f if line.strip()), None)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable ({e}); check the file") from None
    if raw is not None:
        _text_of_line(raw, f"{path}:1", field)


def stream_files(spec: str | None, key: str) -> list[str]:
    """The files a comma-separated list of files, directories and glob patterns names, in
    sorted order (readers.expand_inputs); DataError naming `key` when there are none or one is
    not a Parquet / JSONL file."""
    from parcae_jax.data.readers import expand_inputs

    if not spec:
        raise DataError(f"data.source=stream needs {key}: Parquet or JSONL(.gz) files, directories or globs, "
                        "comma-separated")
    files = []
    try:
        for item in (item.strip() for item in spec.split(",") if item.strip()):
            files += _expand_remote(item) if "://" in item else expand_inputs([item])
    except DataError as e:
        raise DataError(f"{key}: {str(e).removeprefix('--input=')}") from None
    other = [f for f in files if not f.endswith(STREAM_SUFFIXES)]
    if other:
        raise DataError(f"{key}: {other[0]} is not a {'/'.join(STREAM_SUFFIXES)} file; a stream reads only those "
                        "(prepare .txt files with python -m parcae_jax.commands.prepare)")
    return files


def _walk(folder) -> Iterator:
    """Every file under an epath folder (epath's rglob refuses gs://: one listing per folder here)."""
    for child in folder.iterdir():
        if child.is_dir():
            yield from _walk(child)
        else:
            yield child


def _expand_remote(item: str) -> list[str]:
    """A gs:// file, folder (searched recursively for stream files) or glob pattern, sorted."""
    from parcae_jax import storage

    try:
        path = storage.resolve(item)
        if any(c in item for c in "*?["):
            cut = min(item.index(c) for c in "*?[" if c in item)
            base = item[:item.rindex("/", 0, cut)]
            found = sorted(os.fspath(p) for p in storage.resolve(base).glob(item[len(base) + 1:]))
            if not found:
                raise DataError(f"{item}: the pattern matches no file")
            return found
        if path.is_dir():
            found = sorted(os.fspath(p) for p in _walk(path) if os.fspath(p).endswith(STREAM_SUFFIXES))
            if not found:
                raise DataError(f"{item}: the folder holds no {'/'.join(STREAM_SUFFIXES)} file")
            return found
        if not path.exists():
            raise DataError(f"{item}: no such file or folder")
    except (OSError, storage.StorageError) as e:
        raise DataError(f"{item}: cannot be listed ({str(e).splitlines()[0][:120]})") from None
    return [item]
