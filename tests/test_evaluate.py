"""The lm-evaluation-harness adapter against a slow reference loop over the model's own
log-likelihoods: one request at a time, unpadded, unbatched, through `model.apply`."""

import functools
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from lm_eval.api.instance import Instance

from parcae_jax.data.tokenizer import ByteTokenizer
from parcae_jax.infer.generator import Generator
from parcae_jax.infer.harness import HarnessLM
from parcae_jax.interop import convert
from parcae_jax.model import build, init_params
from parcae_jax.model.recurrence import evaluation_state
from tests.conftest import FIXTURES, ROOT
from tests.forkserver import run_module
from tests.helpers import tiny

PARCAE = FIXTURES / "reference_parcae_tiny"
TASK = FIXTURES / "eval" / "sample_mc.yaml"
R = 3


@pytest.fixture(scope="module")
def parcae():
    return convert.load_reference(str(PARCAE))


@functools.lru_cache(maxsize=8)
def _reference_apply(cfg, recurrence: int):
    model = build(cfg)
    return jax.jit(lambda params, ids, x0: model.apply({"params": params}, ids, recurrence=recurrence,
                                                        initial_state=x0))


def reference_loglikelihood(cfg, params, context: list[int], continuation: list[int], recurrence: int) -> float:
    """One row through `model.apply`. It is padded on the right to a whole number of blocks (a
    few compiled programs instead of one per length): the model is causal, so the logits of the
    real positions, with their own x0, are what the unpadded row gives."""
    ids = np.array([context + continuation])
    length = ids.shape[1] - 1
    x0 = evaluation_state(cfg, 0, length)
    pad = -length % cfg.block_size
    logits = _reference_apply(cfg, recurrence)(params, np.pad(ids[:, :-1], ((0, 0), (0, pad))),
                                                np.pad(np.asarray(x0), ((0, 0), (0, pad), (0, 0))))[:, :length]
    logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1), np.float64)
    n = len(continuation)
    return float(sum(logp[t, ids[0, t + 1]] for t in range(length - n, length)))


def _instances(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_match_the_reference_loop_whatever_the_batch(parcae):
    cfg, params = parcae
    pairs = [("Question: Which keyword defines a function?\nAnswer:", c) for c in (" def", " class", " import x")]
    pairs += [("x" * 50, " and more than fits in the block"), ("a", " b")]  # one cut from the left
    pairs += [("a", "y" * 80)]  # a continuation longer than the block: its last block_size tokens are scored
    tok = ByteTokenizer()
    got = HarnessLM(cfg, params, tok, recurrence=R, batch_size=2).loglikelihood(_instances("loglikelihood", pairs))
    for (ctx, cont), (ll, _) in zip(pairs, got):
        c, k = list(ctx.encode()), list(cont.encode())
        whole = (c + k)[-(cfg.block_size + 1):]
        n = min(len(k), len(whole) - 1)
        want = reference_loglikelihood(cfg, params, whole[:-n], whole[-n:], R)
        assert abs(ll - want) < 1e-4, (ctx, cont, ll, want)


def test_rolling_loglikelihood_is_the_whole_text_after_the_end_of_document_token():
    """Texts of one and of three blocks, scored together: each is the sum over its 64-token
    chunks of log p(chunk | the 64 tokens before it, end-of-document first)."""
    cfg = tiny(vocab_size=320)  # block 64
    params = nn.unbox(init_params(build(cfg), jax.random.key(1)))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
    tok = ByteTokenizer()
    texts = ["def f(x):\n    return x + 1\n", "".join(f"x{i} = {i * i}\n" for i in range(20))]
    assert len(texts[1]) > 2 * cfg.block_size
    got = HarnessLM(cfg, params, tok, recurrence=2, batch_size=3).loglikelihood_rolling(
        _instances("loglikelihood_rolling", [(t,) for t in texts]))
    for text, ll in zip(texts, got):
        ids = [tok.eod_id] + list(text.encode())
        want, n = 0.0, cfg.block_size
        for start in range(1, len(ids), n):  # the chunk ids[start:start + n], with the most context that fits
            end = min(start + n, len(ids))
            window = ids[max(end - n - 1, 0):end]
            want += reference_loglikelihood(cfg, params, window[:-(end - start)], window[-(end - start):], 2)
        assert abs(ll - want) < 1e-3, (text[:10], ll, want)


def test_generate_until_batches_requests_and_cuts_each_at_its_first_stop_string(parcae):
    cfg, params = parcae
    tok = ByteTokenizer()
    lm = HarnessLM(cfg, params, tok, recurrence=2, batch_size=2)
    gen = Generator(cfg, params, recurrence=2, dtype=cfg.dtype)
    prompts = ["def f(", "class Point:", "import o"]
    alone = [tok.decode(gen.generate([list(p.encode())], 12).tokens[0]) for p in prompts]
    stops = [a[5:7] for a in alone]
    requests = [(p, {"until": [s], "max_gen_toks": 12}) for p, s in zip(prompts, stops)]
    requests.append(("def f(", {"until": ["\x00never"], "max_gen_toks": 5}))  # other settings: its own batch
    got = lm.generate_until(_instances("generate_until", requests))
    assert got[:3] == [a[:a.index(s)] for a, s in zip(alone, stops)]
    assert got[3] == tok.decode(gen.generate([list(b"def f(")], 5).tokens[0])


def _cli(*args, env=None):
    return run_module("parcae_jax.commands.evaluate", [*args], cwd=ROOT, timeout=600, env=env)


@pytest.mark.slow
def test_the_command_prints_a_table_and_writes_the_scores_the_reference_loop_gives(parcae, tmp_path):
    """`evaluate` on the shipped task: the table, the JSON, and acc and acc_norm at each
    recurrence recomputed from reference log-likelihoods."""
    import os

    out = tmp_path / "scores.json"
    done = _cli(f"--checkpoint={PARCAE}", "--tokenizer=bytes", f"--tasks={TASK}", f"--recurrences=1,{R}",
                f"--output={out}", "--eval_batch_size=4", env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"| task | metric | R=1 | R={R} |" in done.stdout and "| parcae_sample_mc | acc |" in done.stdout
    saved = json.loads(out.read_text())
    assert saved["recurrences"] == [1, R] and set(saved["scores"]["parcae_sample_mc"]) == {"1", str(R)}
    speed = saved["scoring_tokens_per_s"]  # the adapter's throughput at each R (issue 27)
    assert set(speed) == {"1", str(R)} and all(v > 0 for v in speed.values())
    cfg, params = parcae
    docs = [json.loads(line) for line in (FIXTURES / "eval" / "sample_mc.jsonl").read_text().splitlines()]
    for r in (1, R):
        acc = acc_norm = 0
        for d in docs:
            ctx = list(f"Question: {d['question']}\nAnswer:".encode())
            lls = [reference_loglikelihood(cfg, params, ctx, list((" " + c).encode()), r) for c in d["choices"]]
            acc += int(np.argmax(lls) == d["answer"])
            # lm-eval: the choice's characters
            acc_norm += int(np.argmax([ll / len(c) for ll, c in zip(lls, d["choices"])]) == d["answer"])
        got = saved["scores"]["parcae_sample_mc"][str(r)]
        assert got["acc"] == acc / len(docs) and got["acc_norm"] == acc_norm / len(docs), (r, got, acc, acc_norm)
