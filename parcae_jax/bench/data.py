"""Input-pipeline benchmark: preparation MB/s, loader tokens/s, and the tiny model's appetite.

    python -m parcae_jax.commands.bench_data [--out=bench_data.json]

prints one JSON object: preparation speed on the embedded corpus (~12 MB of text) with
the byte tokenizer (in process) and with a 32768-token BPE (2 worker processes), loader
speed (tokens/s delivered, 0 and 2 workers) at the tiny config's shape, the tokens/s the
tiny config's training step consumes (`--mode=bench`'s measurement), and their ratio.
"""

from __future__ import annotations

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
    m = prepare(iter(docs), os.path.join(tmp, "bpe"), path, workers=2, progress=False)
    out["prepare_bpe_2_workers_mb_per_s"] = m["text_bytes_this_run"] / m["seconds_this_run"] / 1e6
    tokens = m["splits"]["train"]["tokens"] + m["splits"]["validation"]["tokens"]
    out["bpe_bytes_per_token"] = out["corpus_mb"] * 1e6 / tokens
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


def bench_tiny_step(batch: int) -> dict:
    """Tokens/s of the tiny config's real training step (--mode=bench): what the loader must outrun."""
    from parcae_jax.bench import bench
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
    return result


if __name__ == "__main__":  # an old command line: say where the command went instead of doing nothing
    from parcae_jax.errors import moved

    moved("parcae_jax.commands.bench_data")
