"""Generation against the official `forward_for_generation`, and the cache against the full forward.

tests/fixtures/reference_{parcae,gpt}_tiny/generation.npz were written by the official code
(fp32, CPU) from the fixture weights: the 16-token prompts, the initial state x0 it was
given at each position, and for each (recurrence, cache strategy) the 32 greedy tokens and
the 32 next-token logits that chose them (docs/inference.md).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae_jax.infer import decode
from parcae_jax.infer.generator import GenerationError, Generator
from parcae_jax.infer.sampling import Sampling
from parcae_jax.interop import convert
from parcae_jax.model import build, init_params
from tests.conftest import FIXTURES
from tests.forkserver import run_module

PARCAE, GPT = FIXTURES / "reference_parcae_tiny", FIXTURES / "reference_gpt_tiny"


@pytest.fixture(scope="module")
def parcae():
    return convert.load_reference(str(PARCAE))


@pytest.fixture(scope="module")
def gpt():
    return convert.load_reference(str(GPT))


def official_cases():
    names = [k[len("tokens_"):] for k in np.load(PARCAE / "generation.npz").files if k.startswith("tokens_")]
    return [(int(n.split("_", 1)[0][1:]), n.split("_", 1)[1]) for n in names]


def test_the_fixture_covers_what_the_issue_names():
    cases = official_cases()
    assert {r for r, s in cases if s == "full"} == {1, 4, 8}
    assert {s.rstrip("0123456789") for _, s in cases} >= {"full", "compress-first", "compress-last", "compress-stride",
                                                         "compress-s", "compress-r", "compress-boundaries"}


@pytest.mark.slow
@pytest.mark.parametrize("recurrence,strategy", official_cases())
def test_greedy_generation_matches_the_official_code(parcae, recurrence, strategy):
    cfg, params = parcae
    g = np.load(PARCAE / "generation.npz")
    name = f"r{recurrence}_{strategy}"
    out = Generator(cfg, params, recurrence=recurrence, strategy=strategy).generate(
        g["prompt"].tolist(), 32, x0=g["x0"], return_logits=True)
    assert np.array(out.tokens).tolist() == g[f"tokens_{name}"].tolist()
    np.testing.assert_allclose(out.step_logits, g[f"logits_{name}"], atol=1e-4, rtol=0)
    assert out.mean_depth == recurrence


def test_gpt_greedy_generation_matches_the_official_code(gpt):
    cfg, params = gpt
    g = np.load(GPT / "generation.npz")
    out = Generator(cfg, params).generate(g["prompt"].tolist(), 32, return_logits=True)
    assert np.array(out.tokens).tolist() == g["tokens_gpt"].tolist()
    np.testing.assert_allclose(out.step_logits, g["logits_gpt"], atol=1e-4, rtol=0)


def _decode_every_prefix(cfg, params, ids, x0, plan, prompt=8):
    """Logits of prefill(ids[:, :prompt]) then one decode call per later token: [B, T, V]."""
    f = jax.jit(lambda p, i, c, x, fresh=False: decode.forward(plan, p, i, c, x, fresh=fresh), static_argnums=4)
    cache = decode.init_cache(plan, np.zeros(ids.shape[0], np.int32))
    logits, cache, _ = f(params, ids[:, :prompt], cache, None if x0 is None else x0[:, :prompt], True)
    rows = [logits]
    for t in range(prompt, ids.shape[1]):
        logits, cache, _ = f(params, ids[:, t:t + 1], cache, None if x0 is None else x0[:, t:t + 1])
        rows.append(logits)
    return np.concatenate(rows, axis=1)


@pytest.mark.parametrize("model", ["fixture", "gqa-untied"])
def test_a_prefill_runs_its_final_block_for_the_last_token_only_and_loses_nothing(parcae, model):
    """last_only (a prefill): the coda's last block writes every token's keys and values but
    computes its queries, attention, output projection and MLP for the last token alone. The
    cache is the same to the bit, the last logits the same to rounding, and the program has
    one full-length MLP fewer: its last fc runs on one row. Grouped-query attention too.
    (Where the CPU kernel runs prefills, one slot only to rounding: see below.)"""
    import re

    if model == "fixture":
        cfg, params = parcae
        ids = np.load(PARCAE / "input_ids.npy")[:, :16].astype(np.int32)
        x0 = np.load(PARCAE / "state_init.npy")[:, :16]
    else:
        cfg, params = _variant(model)
        ids = np.asarray(jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size), np.int32)
        x0 = np.asarray(jax.random.normal(jax.random.key(3), (2, 16, cfg.d_rec))) * 0.1
    B, T = ids.shape
    plan = decode.Plan(cfg, 2, max_len=32)
    cache = decode.init_cache(plan, np.zeros(B, np.int32))
    runs = {}
    for last in (True, False):
        prefill = lambda p, i, c, x, last=last: decode.forward(plan, p, i, c, x, fresh=True, last_only=last)  # noqa: E731
        lowered = jax.jit(prefill).lower(params, ids, cache, x0)
        fc = re.findall(rf"\(tensor<{B}x(\d+)x{cfg.d_model}xf32>, tensor<{cfg.d_model}x{cfg.d_mlp}xf32>\)",
                        lowered.as_text())  # the MLPs' fc products, by their rows
        runs[last] = (lowered.compile()(params, ids, cache, x0), sorted(fc))
    (logits, new, _), fc = runs[True]
    (logits_all, new_all, _), fc_all = runs[False]
    assert logits.shape == (B, 1, logits_all.shape[-1])
    np.testing.assert_allclose(logits[:, 0], logits_all[:, -1], atol=2e-5, rtol=0)
    # Every slot equal to the bit, but for the last block's keys where the CPU kernel ran the full
    # prefill (it rotates and normalises the keys itself, in another rounding than XLA's, which
    # processes them when one query is left): those to rounding.
    differ = [i for i, (a, b) in enumerate(zip(jax.tree.leaves(new), jax.tree.leaves(new_all)))
              if not np.array_equal(a, b)]
    assert len(differ) <= 1, differ
    for i in differ:
        a, b = jax.tree.leaves(new)[i], jax.tree.leaves(new_all)[i]
        np.testing.assert_allclose(a, b, atol=1e-6 * float(np.max(np.abs(b))), rtol=0)
    if model == "fixture":  # (an untied head over 256 ids has the fc's operand shapes)
        assert fc_all == [str(T)] * len(fc_all) and fc == ["1"] + [str(T)] * (len(fc_all) - 1)


# Sharing strategies at settings where no two iterations share a slot: each must equal "full".
EXACT = ["full", "compress-first4", "compress-stride1", "compress-s4", "compress-r1"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", EXACT)
def test_decoding_with_the_cache_equals_the_full_forward_on_each_prefix(parcae, strategy):
    cfg, params = parcae
    ids = np.load(PARCAE / "input_ids.npy")[:, :20].astype(np.int32)
    x0 = np.load(PARCAE / "state_init.npy")[:, :20]
    full = build(cfg).apply({"params": params}, ids, recurrence=4, initial_state=x0)
    cached = _decode_every_prefix(cfg, params, ids, x0, decode.Plan(cfg, 4, strategy, max_len=32))
    np.testing.assert_allclose(cached, full, atol=2e-5, rtol=0)


def test_gpt_decoding_with_the_cache_equals_the_full_forward(gpt):
    cfg, params = gpt
    ids = np.load(GPT / "input_ids.npy")[:, :20].astype(np.int32)
    full = build(cfg).apply({"params": params}, ids)
    cached = _decode_every_prefix(cfg, params, ids, None, decode.Plan(cfg, max_len=64))
    np.testing.assert_allclose(cached, full, atol=2e-5, rtol=0)


# Settings the fixture does not have: grouped-query attention, no qk-norm, an untied head
# over a padded vocabulary, no value embeddings, core heads of another width; a Parcae with
# neither prelude nor coda; the additive injection, which has no parameters (decoding once
# looked them up by name and failed on it).
VARIANTS = {
    "gqa-untied": dict(vocab_size=250, n_kv_heads=2, qk_norm=False, tie_embeddings=False, value_embeds=False,
                       n_rec_heads=2),
    "core-only": dict(n_prelude=0, n_coda=0),
    "add-injection": dict(injection="add"),
}


def _variant(name):
    from tests.helpers import tiny

    cfg = tiny(**VARIANTS[name])
    params = nn.unbox(init_params(build(cfg), jax.random.key(0)))
    # perturbed, so that the zero-initialised output projections do not make blocks identities
    return cfg, jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)


@pytest.mark.slow
@pytest.mark.parametrize("name,batch,prompt", [("gqa-untied", 1, 1), ("core-only", 2, 5), ("add-injection", 1, 3)])
def test_decoding_other_shapes_equals_the_full_forward(name, batch, prompt):
    cfg, params = _variant(name)
    ids = np.asarray(jax.random.randint(jax.random.key(2), (batch, 12), 0, cfg.vocab_size), np.int32)
    x0 = np.asarray(jax.random.normal(jax.random.key(3), (batch, 12, cfg.d_rec))) * 0.1
    full = build(cfg).apply({"params": params}, ids, recurrence=3, initial_state=x0)
    cached = _decode_every_prefix(cfg, params, ids, x0, decode.Plan(cfg, 3, max_len=16), prompt=prompt)
    np.testing.assert_allclose(cached, full, atol=2e-5, rtol=0)


@pytest.mark.slow
def test_ids_that_only_pad_the_vocabulary_are_never_generated():
    cfg, params = _variant("gqa-untied")  # vocab 250 in a table of 256
    first = int(Generator(cfg, params, recurrence=2).generate([[1, 2, 3]], 1).tokens[0][0])
    kernel = params["lm_head"]["kernel"]  # the padding columns: 3x the winner's, so they would win
    params = dict(params, lm_head={"kernel": kernel.at[:, cfg.vocab_size:].set(3 * kernel[:, first:first + 1])})
    for s in (Sampling(), Sampling(temperature=1.0)):
        out = Generator(cfg, params, recurrence=2).generate([[1, 2, 3]], 8, s, return_logits=True)
        assert out.step_logits[0, 0].argmax() >= cfg.vocab_size  # the padding would win unmasked
        assert max(out.tokens[0]) < cfg.vocab_size


@pytest.mark.slow
def test_a_padded_row_generates_what_it_generates_alone_from_drawn_states(parcae):
    """Without the caller's x0: the states are drawn per real position, and sampling per row."""
    cfg, params = parcae
    ids = np.load(PARCAE / "input_ids.npy").astype(np.int32)
    prompts = [ids[0, :5].tolist(), ids[1, :21].tolist()]  # 21 tokens: another prompt bucket alone
    gen = Generator(cfg, params, recurrence=2)
    for s in (Sampling(), Sampling(temperature=1.0)):
        together = gen.generate(prompts, 8, s, seed=4, return_logits=True)
        alone = gen.generate(prompts[:1], 8, s, seed=4, return_logits=True)
        assert alone.tokens[0] == together.tokens[0]
        np.testing.assert_allclose(alone.step_logits[0], together.step_logits[0], atol=2e-5)
    greedy = gen.generate(prompts, 8, seed=4).tokens[1]
    assert gen.generate(prompts[1:], 8, seed=4).tokens[0] == greedy


def test_a_padded_row_generates_what_it_generates_alone(parcae):
    cfg, params = parcae
    ids = np.load(PARCAE / "input_ids.npy").astype(np.int32)
    prompts = [ids[0, :5].tolist(), ids[1, :13].tolist()]
    gen = Generator(cfg, params, recurrence=2)
    x0 = np.asarray(jax.random.normal(jax.random.key(3), (2, 40, cfg.d_rec))) * 0.05
    together = gen.generate(prompts, 8, x0=x0, return_logits=True)
    for b, p in enumerate(prompts):  # alone, the row's own states sit at its unpadded positions
        shift = 13 - len(p)
        alone = gen.generate([p], 8, x0=x0[b:b + 1, shift:], return_logits=True)
        assert alone.tokens[0] == together.tokens[b]
        np.testing.assert_allclose(alone.step_logits[0], together.step_logits[b], atol=2e-5)


def test_sampling_is_reproducible_from_the_seed(parcae):
    cfg, params = parcae
    gen = Generator(cfg, params, recurrence=2)
    s = Sampling(temperature=1.0, top_k=50, top_p=0.9)
    a, b, c = (gen.generate([[1, 2, 3]] * 2, 12, s, seed=k).tokens for k in (0, 0, 1))
    assert a == b and a != c


def test_a_stop_token_ends_its_row_only(parcae):
    cfg, params = parcae
    gen = Generator(cfg, params, recurrence=4)
    g = np.load(PARCAE / "generation.npz")
    want = g["tokens_r4_full"]
    stop = int(want[0, 3])
    out = gen.generate(g["prompt"].tolist(), 32, stop_ids=(stop,), x0=g["x0"])
    first = [i for i, t in enumerate(want[1]) if t == stop]
    assert out.tokens[0] == want[0, :list(want[0]).index(stop)].tolist() and out.stopped[0]
    assert out.tokens[1] == want[1, :first[0] if first else 32].tolist()


def test_a_prompt_longer_than_the_block_size_is_refused_before_compiling(parcae):
    cfg, params = parcae
    with pytest.raises(GenerationError, match="exceeds the model's block size 64"):
        Generator(cfg, params).generate([[1] * 60], 8)


@pytest.mark.slow
def test_an_exit_threshold_of_zero_changes_nothing(parcae):
    cfg, params = parcae
    g = np.load(PARCAE / "generation.npz")
    for rule in ("delta", "kl"):
        out = Generator(cfg, params, recurrence=8, exit_rule=rule, exit_threshold=0.0).generate(
            g["prompt"].tolist(), 8, x0=g["x0"], return_logits=True)
        np.testing.assert_allclose(out.step_logits, g["logits_r8_full"][:, :8], atol=1e-4)
        assert out.mean_depth == 8


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["delta", "kl"])
def test_a_settled_token_stops_and_its_skipped_slots_hold_its_last_keys(parcae, rule):
    cfg, params = parcae
    plan = decode.Plan(cfg, 6, "full", max_len=16, exit_rule=rule, exit_threshold=1e9)  # settles at once
    ids = np.load(PARCAE / "input_ids.npy")[:, :9].astype(np.int32)
    cache = decode.init_cache(plan, np.zeros(2, np.int32))
    _, cache, depth = decode.forward(plan, params, ids[:, :8], cache, None)
    assert depth.tolist() == [6, 6]  # the prompt runs every iteration
    _, after, depth = jax.jit(lambda c: decode.forward(plan, params, ids[:, 8:], c, None, adaptive=True))(cache)
    assert depth.tolist() == [2, 2]  # the first iteration never exits; the second settles
    slots = plan.core_slots()
    for j in range(cfg.n_core):
        for kv_after, kv_before in ((after.core_k, cache.core_k), (after.core_v, cache.core_v)):
            last = kv_after[slots[1, j]][:, 8]
            for r in range(2, 6):
                np.testing.assert_array_equal(kv_after[slots[r, j]][:, 8], last)
            np.testing.assert_array_equal(kv_after[slots[5, j]][:, :8], kv_before[slots[5, j]][:, :8])


@pytest.mark.slow
def test_exit_under_a_strategy_that_shares_a_slot_within_an_iteration(parcae):
    """compress-r5 at n_core = 2 puts both core layers of iteration 1, then layer 0 of the
    skipped iteration 2, in one slot. A first token (nothing before it to attend to) settles
    after 2 iterations; each slot must then hold what `full` holds in the slot of the last
    application mapped to it."""
    cfg, params = parcae
    ids = np.load(PARCAE / "input_ids.npy")[:, :1].astype(np.int32)
    got = {}
    for strategy in ("full", "compress-r5"):
        plan = decode.Plan(cfg, 8, strategy, max_len=8, exit_rule="delta", exit_threshold=1e9)
        cache = decode.init_cache(plan, np.zeros(2, np.int32))
        logits, cache, depth = decode.forward(plan, params, ids, cache, None, adaptive=True)
        assert depth.tolist() == [2, 2]
        got[strategy] = plan.core_slots(), cache, logits
    (full_slots, full, full_logits), (slots, shared, logits) = got["full"], got["compress-r5"]
    assert slots[1, 0] == slots[1, 1]
    np.testing.assert_allclose(logits, full_logits, atol=1e-6)
    for s in range(len(shared.core_k)):
        r, j = max((r, j) for r in range(8) for j in range(cfg.n_core) if slots[r, j] == s)
        np.testing.assert_allclose(shared.core_k[s][:, 0], full.core_k[full_slots[r, j]][:, 0], atol=1e-6)
        np.testing.assert_allclose(shared.core_v[s][:, 0], full.core_v[full_slots[r, j]][:, 0], atol=1e-6)


@pytest.mark.slow
def test_a_one_token_prompt_runs_every_iteration(parcae):
    cfg, params = parcae
    plain = Generator(cfg, params, recurrence=6).generate([[7]], 3, return_logits=True)
    exits = Generator(cfg, params, recurrence=6, exit_rule="delta", exit_threshold=1e9).generate(
        [[7]], 3, return_logits=True)
    np.testing.assert_allclose(exits.step_logits[:, 0], plain.step_logits[:, 0], atol=1e-6)
    assert exits.mean_depth == (6 + 2 + 2) / 3


@pytest.mark.slow
def test_rows_exit_independently(parcae):
    """A row's tokens and depth do not depend on the rows batched with it."""
    cfg, params = parcae
    g = np.load(PARCAE / "generation.npz")
    gen = Generator(cfg, params, recurrence=8, exit_rule="delta", exit_threshold=0.1)
    both = gen.generate(g["prompt"].tolist(), 12, x0=g["x0"], return_logits=True)
    assert 3 < both.mean_depth < 7
    for b in range(2):
        alone = gen.generate(g["prompt"][b:b + 1].tolist(), 12, x0=g["x0"][b:b + 1], return_logits=True)
        assert alone.tokens[0] == both.tokens[b]
        np.testing.assert_allclose(alone.step_logits[0], both.step_logits[b], atol=2e-5)


def test_top_k_and_top_p_keep_the_tokens_numpy_says():
    from parcae_jax.infer.sampling import filtered_logits

    logits = np.asarray(jax.random.normal(jax.random.key(0), (3, 50)) * 3)
    for k, p in [(5, 1.0), (0, 0.5), (10, 0.3), (0, 1e-6)]:
        kept = np.isfinite(np.asarray(filtered_logits(jnp.asarray(logits), Sampling(1.0, k, p))))
        for row, keep in zip(logits, kept):
            order = np.argsort(-row, kind="stable")
            n = k if k else 50
            probs = np.exp(row[order[:n]] - row[order[0]])
            probs /= probs.sum()
            m = int(np.searchsorted(np.cumsum(probs), p) + 1) if p < 1 else n
            assert set(np.flatnonzero(keep)) == set(order[:min(m, n)].tolist())


def test_sampling_draws_from_the_tempered_distribution():
    from parcae_jax.infer.sampling import next_token

    logits = jnp.array([[0.0, 1.0, 2.0, -1.0]] * 20000)
    draws = np.asarray(next_token(logits, jax.random.key(1), Sampling(temperature=2.0)))
    want = np.exp(np.array([0.0, 0.5, 1.0, -0.5]))
    want /= want.sum()
    got = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(got, want, atol=0.015)


def _cli(*args):
    from tests.conftest import ROOT

    return run_module("parcae_jax.commands.generate", [*args], cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_the_command_line_generates_what_the_api_does(parcae):
    import json

    cfg, params = parcae
    done = _cli(f"--checkpoint={PARCAE}", "--tokenizer=bytes", "--prompt=def f(x):", "--prompt=import",
                "--max_new_tokens=6", "--recurrence=2", "--temperature=0.7", "--top_k=20", "--seed=5", "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    prompts = [list("def f(x):".encode()), list(b"import")]
    want = Generator(cfg, params, recurrence=2).generate(prompts, 6, Sampling(0.7, 20), stop_ids=(256,), seed=5)
    assert got["tokens"] == want.tokens and got["mean_depth"] == 2
