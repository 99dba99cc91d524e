"""The lm-eval adapter's rolling log-likelihood, batched against one call per document.

    python -m parcae_jax.commands.evaluate --bench [--bench_config=bench_cpu] [--dtype=bfloat16]

builds the config's model with random weights (scoring speed does not depend on their
values) and `documents` synthetic texts of one to four blocks (ByteTokenizer, fixed seed), and
scores them three ways: every document in one `loglikelihood_rolling` call (their windows
batched together, harness.py), one call per document at the same batch size (each call's
windows padded to a full batch, as a lone request is), and one call per document at batch
size 1 (no padding: what batching itself gains). Each way runs once to compile, then is
timed. Reported: seconds and tokens/s of each, the speed-ups of the batched call, the
largest difference between the batched and the per-document scores, absolute and relative (the
same numbers up to float32 summation order: a score sums up to a thousand token log-probabilities),
and the machine.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import numpy as np
from lm_eval.api.instance import Instance

from parcae_jax.bench.roof import cpu_name
from parcae_jax.data.tokenizer import ByteTokenizer
from parcae_jax.infer.harness import HarnessLM
from parcae_jax.model import build, init_params
from parcae_jax.model.config import ModelConfig

_WORDS = ("the", "loop", "state", "of", "a", "model", "runs", "again", "with", "weights", "shared", "and",
          "injected", "prelude", "coda", "token", "each", "step", "decays", "towards", "fixed", "point")


def documents(n: int, block_size: int, seed: int = 0) -> list[str]:
    """n texts of random words, their byte lengths spread over one to four blocks."""
    rng = np.random.default_rng(seed)
    texts = []
    for length in rng.integers(block_size // 2, 4 * block_size, n):
        words = []
        while sum(len(w) + 1 for w in words) < length:
            words.append(_WORDS[rng.integers(len(_WORDS))])
        texts.append(" ".join(words)[:length])
    return texts


def bench_rolling(cfg: ModelConfig, n_documents: int = 64, recurrence: int | None = None,
                  batch_size: int = 16) -> dict:
    """One JSON-ready dict (see the module docstring)."""
    params = jax.jit(lambda k: nn.unbox(init_params(build(cfg), k)))(jax.random.key(0))
    tok = ByteTokenizer()
    texts = documents(n_documents, cfg.block_size)
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    ways = {"batched": (batch_size, [requests]),
            "per_document": (batch_size, [[r] for r in requests]),
            "per_document_batch_1": (1, [[r] for r in requests])}
    seconds, scores, tokens = {}, {}, 0
    for name, (size, calls) in ways.items():
        lm = HarnessLM(cfg, params, tok, recurrence=recurrence, batch_size=size)
        for call in calls:  # compiles every padded length this way meets
            lm.loglikelihood_rolling(call)
        lm.scored_tokens = 0
        start = time.perf_counter()
        scores[name] = np.array([s for call in calls for s in lm.loglikelihood_rolling(call)])
        seconds[name] = time.perf_counter() - start
        tokens = lm.scored_tokens
    diff = max(float(np.max(np.abs(scores[k] - scores["batched"]))) for k in ways)
    relative = max(float(np.max(np.abs(scores[k] - scores["batched"]) / np.abs(scores["batched"]))) for k in ways)
    return {"what": "loglikelihood_rolling", "documents": n_documents, "scored_tokens": tokens,
            "batch_size": batch_size, "recurrence": cfg.recurrence_or_mean(recurrence), "dtype": cfg.compute_dtype,
            "block_size": cfg.block_size, "seconds": seconds,
            "tokens_per_s": {k: tokens / s for k, s in seconds.items()},
            "speedup_vs_per_document": seconds["per_document"] / seconds["batched"],
            "speedup_vs_per_document_batch_1": seconds["per_document_batch_1"] / seconds["batched"],
            "max_abs_score_difference": diff, "max_relative_score_difference": relative,
            "cpu": cpu_name(), "backend": jax.default_backend()}
