"""From `config.data` to prepared token shards and loaders.

- source=embedded: the corpus that ships with Python (data/corpus.py), prepared into the
  cache on first use;
- source=prepared: a directory written by `python -m parcae_jax.commands.prepare`, local or
  gs:// (then staged once per host into the cache: data/staging.py);
- source=tfds: a TFDS dataset in array_record format, read through `tfds.data_source`
  (no TensorFlow) and tokenised once into the cache (tokens are smaller than text and
  are not re-tokenised every epoch);
- source=stream: Parquet / JSONL(.gz) files (data.path, data.val_path) read in order and
  tokenised on the fly, never written out (data/stream.py).

`open_data` gives either kind behind one interface: the training loader, the evaluation
batches and the unigram baseline.
"""

from __future__ import annotations

import os

from parcae_jax import storage
from parcae_jax.data import corpus, staging
from parcae_jax.data.pipeline import TokenSplit, make_loader, open_split, read_manifest, unigram_loss
from parcae_jax.data.prepare import prepare
from parcae_jax.data.readers import DataError, read_tfds
from parcae_jax.data.tokenizer import Tokenizer, load_tokenizer

SOURCES = ("embedded", "prepared", "tfds", "stream")


def check(data, model_vocab_size: int, process_count: int = 1) -> Tokenizer:
    """Validates config.data before anything is compiled; returns the tokenizer."""
    if data.source not in SOURCES:
        raise DataError(f"data.source={data.source!r} is unknown; set it to one of {'|'.join(SOURCES)}")
    try:
        storage.check_writable(_cache(data))
    except storage.StorageError as e:
        raise DataError(f"data.cache_dir={e}") from None
    made_with = None  # the tokenizer a local prepared directory records
    if data.source == "prepared":
        if not data.path:
            raise DataError("data.source=prepared needs data.path, the directory prepare wrote")
        if storage.is_remote(data.path):
            staging.remote_manifest(data.path)  # one line if it is not there
        elif not os.path.isdir(data.path):
            raise DataError(f"data.path={data.path}: no such directory")
        else:
            made_with = read_manifest(data.path)["tokenizer"]  # one line if it is not a finished preparation
    if data.source == "stream":
        from parcae_jax.data.stream import process_files
        from parcae_jax.data.stream_files import check_file, stream_files

        train = stream_files(data.path, "data.path")
        process_files(train, process_count - 1, process_count)  # the last process's share is the first to run out
        for path in train + stream_files(data.val_path, "data.val_path"):
            check_file(path, data.text_field)  # one line naming the first unusable file, before compiling
    if data.source == "tfds" and not data.tfds_name:
        raise DataError("data.source=tfds needs data.tfds_name")
    if data.source == "embedded" and data.tokenizer != "bytes":
        raise DataError("data.source=embedded is prepared with data.tokenizer=bytes; set it so")
    tok = load_tokenizer(tokenizer_spec(data), data.eod_token)
    if tok.vocab_size > model_vocab_size:
        raise DataError(f"data.tokenizer has {tok.vocab_size} ids but model.vocab_size={model_vocab_size}; "
                        f"set model.vocab_size to at least {tok.vocab_size}")
    if made_with is not None and int(made_with["vocab_size"]) > model_vocab_size:  # ids past the embedding table
        raise DataError(f"{data.path} was tokenized with {made_with['vocab_size']} ids but "
                        f"model.vocab_size={model_vocab_size}; set model.vocab_size to at least "
                        f"{made_with['vocab_size']}, or prepare the data with the model's tokenizer")
    return tok


def tokenizer_spec(data) -> str:
    """data.tokenizer, with a gs:// file staged to local disk first."""
    return staging.stage_file(data.tokenizer, _cache(data)) if storage.is_remote(data.tokenizer) else data.tokenizer


def _cache(data) -> str:
    return data.cache_dir or corpus.default_cache_dir()


def prepared_dir(data, tok: Tokenizer, progress: bool = True) -> str:
    """The prepared directory for config.data, preparing it into the cache if needed."""
    if data.source == "prepared":
        return staging.stage_prepared(data.path, _cache(data)) if storage.is_remote(data.path) else data.path
    if data.source == "embedded":
        return corpus.embedded_corpus(data.cache_dir, progress=progress)
    name = f"tfds-{data.tfds_name.replace('/', '_')}-{data.tfds_split}-{data.text_field}-{tok.fingerprint}"
    out = os.path.join(_cache(data), name)
    prepare(read_tfds(data.tfds_name, data.tfds_split, data.tfds_data_dir, data.text_field), out, tokenizer_spec(data),
            eod_token=data.eod_token, val_every=data.val_every, workers=0, progress=progress,
            description=f"tfds:{data.tfds_name}/{data.tfds_split}",
            source=f"tfds:{data.tfds_name}/{data.tfds_split}@{data.tfds_data_dir or ''}:{data.text_field}")
    return out


class PreparedData:
    """Prepared train and validation splits (sources embedded, prepared and tfds)."""

    def __init__(self, data, tok: Tokenizer, progress: bool = True):
        self.data = data
        self.train, self.val = open_splits(data, tok, progress)

    def train_loader(self, seq_len: int, global_batch: int, seed: int, process_index: int = 0,
                     process_count: int = 1):
        """Shuffled windows, positioned by step on resume (grain's next index)."""
        return train_loader(self.train, self.data, seq_len, global_batch, seed, process_index, process_count)

    def eval_batches(self, seq_len: int, global_batch: int, n: int, process_index: int = 0,
                     process_count: int = 1) -> list[dict]:
        """This process's rows of the first n validation batches (the same at every evaluation)."""
        loader = eval_loader(self.val, self.data, seq_len, global_batch, process_index, process_count)
        return [b for _, b in zip(range(n), loader)]

    def unigram_loss(self, val_batches: list[dict], vocab_size: int) -> float:
        import grain
        import numpy as np

        source = grain.sources.ArrayRecordDataSource(self.train.paths)
        return unigram_loss((np.frombuffer(source[i], self.train.dtype) for i in range(len(source))), val_batches,
                            vocab_size)


def open_data(data, tok: Tokenizer, progress: bool = True):
    """The training data config.data names: PreparedData, or stream.StreamData for source=stream."""
    if data.source == "stream":
        from parcae_jax.data.stream import StreamData

        return StreamData(data, tok)
    return PreparedData(data, tok, progress)


def open_splits(data, tok: Tokenizer, progress: bool = True) -> tuple[TokenSplit, TokenSplit]:
    if data.source == "stream":
        raise DataError("data.source=stream has no prepared splits: this needs prepared data (embedded, prepared "
                        "or tfds); prepare the files with python -m parcae_jax.commands.prepare")
    directory = prepared_dir(data, tok, progress)
    return open_split(directory, "train", tok.fingerprint), open_split(directory, "validation", tok.fingerprint)


def train_loader(split: TokenSplit, data, seq_len: int, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
    return make_loader(split, seq_len, global_batch, seed=seed, shuffle=True, process_index=process_index,
                       process_count=process_count, num_workers=data.num_workers, read_threads=data.read_threads,
                       prefetch=data.prefetch)


def eval_loader(split: TokenSplit, data, seq_len: int, global_batch: int,
                process_index: int = 0, process_count: int = 1):
    """The validation windows in storage order, one pass: every evaluation sees the same batches."""
    return make_loader(split, seq_len, global_batch, shuffle=False, num_epochs=1, process_index=process_index,
                       process_count=process_count, read_threads=data.read_threads, prefetch=data.prefetch)
