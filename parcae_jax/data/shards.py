"""The files of a prepared dataset, written so that an interrupted run never leaves a
shard that looks complete: `{split}-NNNNN.arrayrecord` (one record per document) and its
`.lengths.npy` are written under temporary names, and the shard is renamed into place last.
Also the manifest's entry for a split. `prepare` uses these; its module docstring has the layout."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np

from parcae_jax.data.staging import sha256_file

RECORD_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: cheap random reads


def atomic_write(path: str, write) -> None:
    """Calls write(tmp) and renames tmp to path, so path is never seen half-written."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    """Writes obj as JSON to path, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    atomic_write(path, write)


def shard_name(split: str, index: int) -> str:
    """The file name of shard `index` of `split`."""
    return f"{split}-{index:05d}.arrayrecord"


def complete_shards(output: str, split: str) -> list[str]:
    """The prefix of shards that were finished (renamed into place, lengths written)."""
    names = []
    for i in itertools.count():
        name = shard_name(split, i)
        if not (os.path.exists(os.path.join(output, name))
                and os.path.exists(os.path.join(output, name + ".lengths.npy"))):
            return names
        names.append(name)


def describe_split(output: str, split: str) -> dict:
    """A split's manifest entry: its complete shards (counts and hashes of both files) and totals."""
    shards = []
    for name in complete_shards(output, split):
        lengths = np.load(os.path.join(output, name + ".lengths.npy"))
        shards.append({"path": name, "documents": int(len(lengths)), "tokens": int(lengths.sum()),
                       "sha256": sha256_file(os.path.join(output, name)),  # checked when staged from GCS
                       "lengths_sha256": sha256_file(os.path.join(output, name + ".lengths.npy"))})
    return {"shards": shards, "documents": sum(x["documents"] for x in shards),
            "tokens": sum(x["tokens"] for x in shards)}


class ShardWriter:
    """Writes one split's shards in turn, starting at shard `index`; `finish` completes the current one."""

    def __init__(self, output: str, split: str, index: int, dtype):
        self.output, self.split, self.index, self.dtype = output, split, index, dtype
        self.writer, self.lengths = None, []

    def add(self, tokens: np.ndarray) -> None:
        """Appends one document's tokens, opening the shard's temporary file on the first."""
        from array_record.python.array_record_module import ArrayRecordWriter

        if self.writer is None:
            self.path = os.path.join(self.output, shard_name(self.split, self.index))
            self.writer = ArrayRecordWriter(self.path + ".tmp", RECORD_OPTIONS)
        self.writer.write(tokens.astype(self.dtype).tobytes())
        self.lengths.append(len(tokens))

    def finish(self) -> None:
        """Closes the open shard (if any): lengths first, then the rename that marks it complete."""
        if self.writer is None:
            return
        self.writer.close()
        atomic_write(self.path + ".lengths.npy",
                     lambda tmp: np.save(open(tmp, "wb"), np.asarray(self.lengths, np.int32)))
        os.replace(self.path + ".tmp", self.path)  # the shard counts as complete from here on
        self.writer, self.lengths, self.index = None, [], self.index + 1
