"""Batched generation: a jitted prefill over the prompts, then a jitted one-token step.

    gen = Generator(cfg, params, recurrence=8)
    out = gen.generate([[1, 2, 3], [4, 5]], max_new_tokens=32, sampling=Sampling(0.8, top_p=0.95))
    out.tokens  # the new tokens of each prompt, up to (not including) a stop token

Prompts are left-padded to a common length rounded up to PROMPT_BUCKET and the cache holds
that plus max_new_tokens rounded up to CACHE_BUCKET, so prompts of similar lengths reuse one
compiled prefill and one compiled step. Each Parcae token's initial state x0 is the seed's
evaluation state of its position (recurrence.evaluation_state: what scoring the same tokens
uses; the official generation draws a new one per call), or the caller's `x0`.

A row generates what it would alone: its states x0 are drawn by its own positions
(`initial_states`), and sampling draws row b from the seed's stream b (the first row of a
batch samples what a batch of one would).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from parcae_jax.infer import GenerationError, decode
from parcae_jax.infer.sampling import Sampling, next_token
from parcae_jax.model.config import ModelConfig
from parcae_jax.model.machine import inference_dtype
from parcae_jax.model.recurrence import evaluation_state

PROMPT_BUCKET = 16
CACHE_BUCKET = 64


def encode(tokenizer, text: str, vocab_size: int) -> list[int]:
    """The text's ids, or GenerationError (one line) when this tokenizer cannot serve the model:
    it cannot encode the text, or gives an id the model has no row for."""
    try:
        ids = [int(t) for t in tokenizer.encode(text)]
    except Exception as e:  # noqa: BLE001 - `tokenizers` raises its own types (a vocabulary without [UNK])
        raise GenerationError(f"{text[:40]!r}: the tokenizer cannot encode it "
                              f"({(str(e).splitlines() or [''])[0][:120]})") from None
    check_vocabulary(ids, vocab_size)
    return ids


def check_vocabulary(ids: list[int], vocab_size: int) -> None:
    """GenerationError for a token id the model has no row for (an embedding lookup would
    clamp it silently): the tokenizer is not the one the model was trained with."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise GenerationError(f"a prompt token (id {bad[0]}) is outside the model's vocabulary [0, {vocab_size}); "
                              "use the tokenizer the model was trained with")


@dataclasses.dataclass
class Output:
    tokens: list[list[int]]  # new tokens per prompt, stop token excluded
    stopped: list[bool]  # the row ended on a stop token
    mean_depth: float  # iterations per generated token (Parcae; the recurrence unless exits fire)
    step_logits: np.ndarray | None = None  # [B, N, V]: the logits each new token was chosen from
    prefill_s: float = 0.0  # wall time of the prompt's forward (and the first token)
    decode_s: float = 0.0  # wall time of the one-token steps after it
    decode_steps: int = 0


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class Generator:
    """Generation from one model at one recurrence and cache strategy (infer/decode.Plan)."""

    def __init__(self, cfg: ModelConfig, params: dict, *, recurrence: int | None = None, strategy: str = "full",
                 exit_rule: str = "none", exit_threshold: float = 0.0, dtype: str | None = None):
        """dtype: the compute dtype (a ModelConfig dtype name); default machine.inference_dtype's."""
        dtype = inference_dtype(dtype)
        cfg = cfg if dtype is None else cfg.replace(dtype=dtype)
        self.cfg, self.params = cfg, params
        self.recurrence = cfg.recurrence_or_mean(recurrence)
        self._plan = functools.partial(decode.Plan, cfg, self.recurrence, strategy,
                                       exit_rule=exit_rule, exit_threshold=exit_threshold)
        plan = self._plan(max_len=1)  # checks strategy, exit rule and recurrence now, before any compile
        if not plan.is_gpt:
            plan.core_slots()  # and the strategy's setting at this recurrence

    def check(self, prompt_lengths: list[int], max_new_tokens: int) -> None:
        """Raises GenerationError for a request the model cannot serve."""
        if not prompt_lengths or min(prompt_lengths) < 1:
            raise GenerationError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        longest, limit = max(prompt_lengths), self.cfg.block_size
        if longest + max_new_tokens > limit:
            raise GenerationError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's "
                                  f"block size {limit}; shorten the prompt or lower max_new_tokens")

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids: tuple[int, ...] = (), seed: int = 0, x0: np.ndarray | None = None,
                 return_logits: bool = False) -> Output:
        """New tokens for every prompt. x0 [B, >= P + N, d_rec] overrides the drawn initial
        states, indexed by cache position (P the padded prompt length); used by parity tests."""
        self.check([len(p) for p in prompts], max_new_tokens)
        check_vocabulary([t for p in prompts for t in p], self.cfg.vocab_size)
        B, P = len(prompts), _round_up(max(len(p) for p in prompts), PROMPT_BUCKET)
        if x0 is not None:
            P = max(len(p) for p in prompts)  # the caller's states are indexed by the unpadded positions
        plan = self._plan(max_len=_round_up(P + max_new_tokens, CACHE_BUCKET))
        pad = np.array([P - len(p) for p in prompts], np.int32)
        ids = np.zeros((B, P), np.int32)
        for b, p in enumerate(prompts):
            ids[b, pad[b]:] = p
        key_sample = jax.random.split(jax.random.key(seed))[1]
        if plan.is_gpt:
            x0_all = jnp.zeros((B, plan.max_len, 1), jnp.float32)
        elif x0 is not None:
            x0_all = (jnp.zeros((B, plan.max_len, self.cfg.d_rec), jnp.float32)
                      .at[:, :x0.shape[1]].set(x0[:, :plan.max_len]))
        else:
            x0_all = initial_states(seed, pad, plan.max_len, self.cfg)
        prefill, step = _compiled(plan, sampling)

        t0 = time.perf_counter()
        tok, cache, logits = prefill(self.params, jnp.asarray(ids), jnp.asarray(pad), x0_all, key_sample)
        out, logs, depths = [np.asarray(tok)], [np.asarray(logits)] if return_logits else [], []
        t1 = time.perf_counter()
        done = np.isin(out[0], stop_ids)
        for i in range(1, max_new_tokens):
            if done.all():
                break
            tok, cache, logits, depth = step(self.params, cache, tok, x0_all, key_sample, np.int32(i))
            out.append(tok)  # left on the device: reading it back only when a stop token may end a row
            depths.append((depth, done.copy()))
            if return_logits:
                logs.append(logits)
            if stop_ids:
                done |= np.isin(np.asarray(tok), stop_ids)
        out = [np.asarray(t) for t in out]
        depths = [np.asarray(d)[~was_done] for d, was_done in depths]
        logs = [np.asarray(x) for x in logs]
        result = self._output(np.stack(out, 1), stop_ids, depths, np.stack(logs, 1) if return_logits else None)
        result.prefill_s, result.decode_s, result.decode_steps = t1 - t0, time.perf_counter() - t1, len(out) - 1
        return result

    def _output(self, toks_BxN: np.ndarray, stop_ids, depths, logits) -> Output:
        tokens, stopped = [], []
        for row in toks_BxN.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
            tokens.append(row if cut is None else row[:cut])
            stopped.append(cut is not None)
        if self.cfg.arch == "gpt":
            mean_depth = 0.0
        else:  # the prompt's last position runs every iteration; decode steps may exit earlier
            n_first = toks_BxN.shape[0]
            all_depths = np.concatenate([np.full(n_first, self.recurrence)] + depths)
            mean_depth = float(all_depths.mean())
        return Output(tokens, stopped, mean_depth, logits)


def initial_states(seed: int, pad_B: np.ndarray, max_len: int, cfg: ModelConfig) -> jax.Array:
    """x0 [B, max_len, d_rec] by cache position: each token's state is the evaluation state
    (recurrence.evaluation_state) of its position in its own row (cache position - padding),
    so a row gets the same states whatever the batch, padding or cache length around it, and
    the states that scoring gives the same tokens."""
    x0_PxR = evaluation_state(cfg, seed, max_len)[0]
    real_BxP = np.maximum(np.arange(max_len)[None, :] - pad_B[:, None], 0)  # padding reuses position 0's
    return x0_PxR[real_BxP]


def _choose(logits_BxV: jax.Array, key: jax.Array, sampling: Sampling, vocab_size: int) -> jax.Array:
    """The next token, never one of the ids that only pad the vocabulary to a tile size."""
    if logits_BxV.shape[-1] > vocab_size:
        logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab_size, logits_BxV, -jnp.inf)
    return next_token(logits_BxV, key, sampling)


@functools.lru_cache(maxsize=16)
def _compiled(plan: decode.Plan, sampling: Sampling):
    """The jitted prefill and step of one plan (cached: a second call with the same shapes
    reuses them). The step donates the cache, so XLA updates it in place."""
    V = plan.cfg.vocab_size

    def prefill(params, ids_BxP, pad_B, x0_all, key):
        P = ids_BxP.shape[1]
        cache = decode.init_cache(plan, pad_B)
        logits, cache, _ = decode.forward(plan, params, ids_BxP, cache, x0_all[:, :P], fresh=True, last_only=True)
        last = logits[:, -1]
        return _choose(last, key, sampling, V), cache, last

    def step(params, cache, tok_B, x0_all, key, i):
        x0 = jax.lax.dynamic_slice_in_dim(x0_all, cache.length, 1, axis=1)
        logits, cache, depth = decode.forward(plan, params, tok_B[:, None], cache, x0, adaptive=True)
        last = logits[:, -1]
        return _choose(last, jax.random.fold_in(key, i), sampling, V), cache, last, depth

    return jax.jit(prefill), jax.jit(step, donate_argnums=(1,))
