"""lm-evaluation-harness's `LM` interface over our jitted forward and generator.

    lm = HarnessLM(cfg, params, tokenizer, recurrence=8)
    lm_eval.simple_evaluate(model=lm, tasks=[...])

Log-likelihoods: each request's context + continuation is cut to the model's block size
(from the left), requests are sorted by length and run `batch_size` at a time, right-padded
to a multiple of LENGTH_BUCKET, through one compiled forward per padded length (the
recurrence is a traced argument, so every R shares it). The loop's initial state is the same
for every request: `recurrence.evaluation_state(cfg, seed, T)` [1, T, d_rec], drawn once, so a
score depends only on the request, not on the batch around it, and equals training's evaluation
of the same tokens. Rolling log-likelihoods score a
text in disjoint windows of the block size (lm-eval's own windowing), every request's windows
batched together; `generate_until` runs Generator on batches of requests with the same
settings (greedy unless the task asks to sample) and cuts each at its first stop string.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from parcae_jax.infer.generator import Generator, encode
from parcae_jax.infer.sampling import Sampling
from parcae_jax.model import build
from parcae_jax.model.config import ModelConfig
from parcae_jax.model.recurrence import evaluation_state

LENGTH_BUCKET = 32


@functools.lru_cache(maxsize=4)
def _scorer(cfg: ModelConfig):
    """jitted (params, ids [B, T], targets [B, T], x0 [1, T, r], R) -> (log p(target) [B, T], argmax == target)."""
    model = build(cfg)

    def score(params, ids, targets, x0, recurrence):
        logits = model.apply({"params": params}, ids, recurrence=recurrence,
                             initial_state=jnp.broadcast_to(x0, (ids.shape[0],) + x0.shape[1:]))
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return picked, jnp.argmax(logits, axis=-1) == targets

    return jax.jit(score)


class HarnessLM(TemplateLM):
    """Our model as an lm-eval LM. tokenizer: any parcae_jax tokenizer (encode/decode/eod_id)."""

    def __init__(self, cfg: ModelConfig, params: dict, tokenizer, recurrence: int | None = None,
                 batch_size: int = 16, seed: int = 0, max_gen_toks: int = 256):
        super().__init__()
        self.cfg, self.params, self.tokenizer_ = cfg, params, tokenizer
        self.recurrence = cfg.recurrence_or_mean(recurrence)
        self.batch_size, self.seed, self.max_gen_toks = batch_size, seed, max_gen_toks
        self._x0 = evaluation_state(cfg, seed, cfg.block_size)
        self.scored_tokens, self.scoring_seconds = 0, 0.0  # what score_tokens ran, for tokens/s
        self._generator = Generator(cfg, params, recurrence=self.recurrence, dtype=cfg.dtype)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eod_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return encode(self.tokenizer_, string, self.cfg.vocab_size)

    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), every continuation token greedy) per pair."""
        limit = self.cfg.block_size
        rows = []
        for ctx, cont in pairs:
            whole = (list(ctx) + list(cont))[-(limit + 1):]
            rows.append((whole[:-1], whole[1:], len(cont)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        score = _scorer(self.cfg)
        start = time.perf_counter()
        for first in range(0, len(order), self.batch_size):
            chunk = order[first:first + self.batch_size]
            T = min(-(-len(rows[chunk[0]][0]) // LENGTH_BUCKET) * LENGTH_BUCKET, limit)
            ids = np.zeros((self.batch_size, T), np.int32)
            tgt = np.zeros((self.batch_size, T), np.int32)
            for b, i in enumerate(chunk):
                inp, targets, _ = rows[i]
                ids[b, :len(inp)], tgt[b, :len(targets)] = inp, targets
            logp, greedy = score(self.params, ids, tgt, self._x0[:, :T], jnp.int32(self.recurrence))
            logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
            for b, i in enumerate(chunk):
                n = len(rows[i][0])
                k = min(rows[i][2], n)  # a continuation longer than the block: the part that fits
                out[i] = (float(logp[b, n - k:n].sum()), bool(greedy[b, n - k:n].all()))
        self.scoring_seconds += time.perf_counter() - start  # compiles included: what a user waits for
        self.scored_tokens += sum(len(r[0]) for r in rows)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self.score_tokens([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []  # every request's windows scored together, batched by length
        for i, (text,) in enumerate(r.args for r in requests):
            for w in get_rolling_token_windows(self.tok_encode(text), self.eot_token_id, self.cfg.block_size, 1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        results = [0.0] * len(requests)
        for i, (score, _) in zip(owner, self.score_tokens(windows)):
            results[i] += score
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation settings run `batch_size` at a time (left-padded);
        each output is cut at its first stop string."""
        groups: dict[tuple, list[tuple[int, list[int]]]] = {}
        for i, (context, kwargs) in enumerate(r.args for r in requests):
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            n_new = min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), self.cfg.block_size - 1)
            # as transformers' generate: sampling without a temperature samples at 1.0
            temperature = float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample", False) else 0.0
            prompt = self.tok_encode(context)[-(self.cfg.block_size - n_new):] or [self.eot_token_id]
            groups.setdefault((until, n_new, temperature), []).append((i, prompt))
        results: list[str] = [""] * len(requests)
        for (until, n_new, temperature), items in groups.items():
            for first in range(0, len(items), self.batch_size):
                chunk = items[first:first + self.batch_size]
                out = self._generator.generate([p for _, p in chunk], n_new, Sampling(temperature),
                                               stop_ids=(self.eot_token_id,), seed=self.seed)
                for (i, _), tokens in zip(chunk, out.tokens):
                    text = self.tokenizer_.decode(tokens)
                    results[i] = text[:min([text.index(s) for s in until if s in text], default=len(text))]
        return results
