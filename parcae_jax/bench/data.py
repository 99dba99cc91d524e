"""Input-pipeline benchmark: preparation MB/s, loader tokens/s, and the tiny model's appetite.

    python -m parcae_jax.commands.bench_data [--out=bench_data.json]

prints one JSON object: preparation speed on the embedded corpus (~12 MB of text) with
the byte tokenizer (in process) and with a 32768-token BPE (1 and 2 worker processes) beside
`tokenizers`' own batch encoding of the same documents (one thread, all cores: the ceiling),
loader speed (tokens/s delivered, 0 and 2 workers) at the tiny config's shape, the same for a
stream of the corpus written as Parquet files, the tokens/s the tiny config's training step
consumes (`--mode=bench`'s measurement), and their ratios.
"""

from __future__ import annotations

import functools
import os
import platform
import tempfile
import time


def bench_prepare(tmp: str) -> dict:
    from parcae_jax.data import corpus
    from parcae_jax.data.prepare import prepare
    from parcae_jax.data.tokenizer import train_bpe

    docs = list(corpus.documents())
    out: dict = {"corpus_mb": sum(len(d.encode()) for d in docs) / 1e6, "corpus_documents": len(docs)}
    m = prepare(iter(docs), os.path.join(tmp, "bytes"), "bytes", workers=0, progress=False)
    out["prepare_bytes_tokenizer_mb_per_s"] = m["text_bytes_this_run"] / m["seconds_this_run"] / 1e6
    t = time.perf_counter()
    tok = train_bpe(iter(docs), vocab_size=32768)
    out["bpe_train_s"] = time.perf_counter() - t
    path = os.path.join(tmp, "bpe.json")
    tok.save(path)
    for workers in (1, 2):
        m = prepare(iter(docs), os.path.join(tmp, f"bpe{workers}"), path, workers=workers, progress=False)
        out[f"prepare_bpe_{workers}_workers_mb_per_s"] = m["text_bytes_this_run"] / m["seconds_this_run"] / 1e6
    tokens = m["splits"]["train"]["tokens"] + m["splits"]["validation"]["tokens"]
    out["bpe_bytes_per_token"] = out["corpus_mb"] * 1e6 / tokens
    out.update(tokenizer_ceiling(docs, path, out["corpus_mb"]))
    out["prepare_over_tokenizer_1"] = out["prepare_bpe_1_workers_mb_per_s"] / out["tokenizer_batch_1_thread_mb_per_s"]
    out["prepare_over_tokenizer_2"] = out["prepare_bpe_2_workers_mb_per_s"] / out["tokenizer_batch_mb_per_s"]
    return out


def tokenizer_ceiling(docs: list[str], path: str, mb: float) -> dict:
    """`tokenizers`' own batch encoding of the same documents in this process, in batches of
    1024: on one thread (TOKENIZERS_PARALLELISM=false) and on all cores: what preparation can
    at best reach with 1 and with all workers."""
    from unittest import mock

    from parcae_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    out = {}
    for name, parallel in (("tokenizer_batch_1_thread_mb_per_s", "false"), ("tokenizer_batch_mb_per_s", "true")):
        with mock.patch.dict(os.environ, TOKENIZERS_PARALLELISM=parallel):
            t = time.perf_counter()
            for i in range(0, len(docs), 1024):
                tok.encode_batch(docs[i:i + 1024])
            out[name] = mb / (time.perf_counter() - t)
    return out


def bench_loader(seq_len: int, batch: int, n: int) -> dict:
    from parcae_jax.data import corpus
    from parcae_jax.data.pipeline import make_loader, open_split

    data = open_split(corpus.embedded_corpus(), "train")
    out = {}
    for workers in (0, 2):
        it = iter(make_loader(data, seq_len, batch, seed=0, num_workers=workers))
        next(it)  # start-up (worker processes) is not throughput
        t = time.perf_counter()
        for _ in range(n):
            next(it)
        out[f"loader_tokens_per_s_{workers}_workers"] = n * batch * seq_len / (time.perf_counter() - t)
        if hasattr(it, "close"):
            it.close()
    return out


def bench_stream(seq_len: int, batch: int, tmp: str) -> dict:
    """Tokens/s of a stream (data/stream.py) over the embedded corpus written as 4 Parquet files,
    byte tokenizer, read and tokenised in 0 and 2 worker processes, timed over one whole pass
    (the workers read ahead: a short timing would measure their buffers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from parcae_jax.data import corpus
    from parcae_jax.data.stream import document_ids, make_stream
    from parcae_jax.data.tokenizer import ByteTokenizer

    docs = list(corpus.documents())
    files = [os.path.join(tmp, f"stream-{i}.parquet") for i in range(4)]
    for i, path in enumerate(files):
        pq.write_table(pa.table({"text": docs[i::4]}), path, row_group_size=64)
    tok = ByteTokenizer()
    n = sum(len(d.encode()) + 1 for d in docs) // (batch * seq_len)
    out = {}
    for workers in (0, 2):
        it = iter(make_stream(files, functools.partial(document_ids, tok), tok.eod_id, seq_len, batch, repeat=True,
                              workers=workers))
        next(it)  # start-up (worker processes) is not throughput
        t = time.perf_counter()
        for _ in range(n):
            next(it)
        out[f"stream_tokens_per_s_{workers}_workers"] = n * batch * seq_len / (time.perf_counter() - t)
        it.close()
    return out


def bench_tiny_step(batch: int) -> dict:
    """Tokens/s of the tiny config's real training step (--mode=bench): what the loader must outrun."""
    from parcae_jax.bench.step import bench
    from parcae_jax.training.defaults import load_shipped
    from parcae_jax.training.validate import validate

    config = load_shipped("tiny")
    config.train.batch_size = batch
    result = bench(config, validate(config, check_data=False))
    return {"tiny_step_tokens_per_sec": result["tokens_per_sec"], "tiny_seq_len": result["seq_len"]}


def measure(batch: int, loader_batches: int) -> dict:
    """The whole benchmark (module docstring) as one JSON-ready dict."""
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "batch_size": batch}
    with tempfile.TemporaryDirectory() as tmp:
        result.update(bench_prepare(tmp))
    step = bench_tiny_step(batch)
    result.update(step)
    result.update(bench_loader(step["tiny_seq_len"], batch, loader_batches))
    result["loader_over_step_ratio"] = max(result["loader_tokens_per_s_0_workers"],
                                           result["loader_tokens_per_s_2_workers"]) / result["tiny_step_tokens_per_sec"]
    with tempfile.TemporaryDirectory() as tmp:
        result.update(bench_stream(step["tiny_seq_len"], batch, tmp))
    result["stream_over_step_ratio"] = max(result["stream_tokens_per_s_0_workers"],
                                           result["stream_tokens_per_s_2_workers"]) / result["tiny_step_tokens_per_sec"]
    return result


if __name__ == "__main__":  # an old command line: say where the command went instead of doing nothing
    from parcae_jax.errors import moved

    moved("parcae_jax.commands.bench_data")
