"""Generate text from a trained run or an official checkpoint, or benchmark decoding.

    python -m parcae_jax.commands.generate --checkpoint=RUN_OR_FOLDER --prompt="Once upon a time" \\
        [--prompt=...] [--max_new_tokens=64] [--temperature=0.8 --top_k=50 --top_p=0.95] \\
        [--recurrence=8] [--cache_strategy=compress-s2] [--exit_rule=kl --exit_threshold=1e-3] \\
        [--seed=0] [--stop_ids=0,...] [--json]

--checkpoint: a training run's workdir (newest checkpoint, or --step; its tokenizer) or a
folder in the official layout (config.json + model.safetensors / pytorch_model.bin / model.pt;
tokenizer.json beside them, else pass --tokenizer). Prompts are batched; generation stops at
the tokenizer's end-of-document token unless --stop_ids says otherwise. --temperature=0 is
greedy. Prints each completion (or, with --json, one JSON object: completions, token ids,
mean recurrence depth, tokens/s).

    python -m parcae_jax.commands.generate --bench [--bench_config=bench_cpu] [--dtype=bfloat16]

prints one JSON object: decode tokens/s at batch 1 and 8 after prompts of 64 and 1024 tokens
(bench/decode.py). Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import time

from absl import flags

from parcae_jax.commands import cli, trained_model
from parcae_jax.commands.trained_model import DTYPE
from parcae_jax.errors import UsageError

_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for a batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "New tokens per prompt at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample within the smallest set holding this probability mass.")
_STOP = flags.DEFINE_list("stop_ids", None, "Token ids that end a completion (default: the end-of-document id).")
_RECURRENCE = flags.DEFINE_integer("recurrence", None, "Loop iterations per token (default: mean_recurrence).")
_STRATEGY = flags.DEFINE_string("cache_strategy", "full", "full, or a sharing strategy: compress-firstK, "
                                "compress-lastK, compress-strideK, compress-sK, compress-rK, compress-boundaries, "
                                "compress-anchor.")
_EXIT = flags.DEFINE_enum("exit_rule", "none", ["none", "delta", "kl"], "Adaptive per-token exit rule.")
_EXIT_THRESHOLD = flags.DEFINE_float("exit_threshold", 0.0, "delta: relative state change; kl: nats.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the completions.")
_BENCH = flags.DEFINE_bool("bench", False, "Benchmark decoding (bench/decode.py) instead.")
_BENCH_CONFIG = flags.DEFINE_string("bench_config", "bench_cpu", "--bench: a shipped config's name.")
_BENCH_PROMPTS = flags.DEFINE_list("bench_prompt_lens", ["64", "1024"], "--bench: prompt lengths.")
_BENCH_BATCHES = flags.DEFINE_list("bench_batches", ["1", "8"], "--bench: batch sizes.")


def _encode(tokenizer, prompt: str, vocab_size: int) -> list[int]:
    """The prompt's ids (GenerationError if the tokenizer cannot serve the model), or one line
    if it gives none."""
    from parcae_jax.infer.generator import encode

    ids = encode(tokenizer, prompt, vocab_size)
    if not ids:
        raise UsageError(f"--prompt={prompt[:40]!r}: the tokenizer maps it to no tokens; give a prompt it can encode")
    return ids


def _bench() -> None:
    from parcae_jax.bench.decode import bench_decode
    from parcae_jax.model.config import ModelConfig
    from parcae_jax.training.defaults import load_shipped, shipped_config

    if shipped_config(_BENCH_CONFIG.value) is None:
        raise UsageError(f"--bench_config={_BENCH_CONFIG.value}: not a shipped config (tiny, bench_cpu, 140m, ...)")
    config = load_shipped(_BENCH_CONFIG.value)
    cfg = ModelConfig.from_mapping(config.model)
    try:
        lens, batches = [int(v) for v in _BENCH_PROMPTS.value], [int(v) for v in _BENCH_BATCHES.value]
    except ValueError:
        raise UsageError("--bench_prompt_lens and --bench_batches take comma-separated integers") from None
    if min(lens + batches, default=0) < 1:
        raise UsageError(f"--bench_prompt_lens={','.join(map(str, lens))} and --bench_batches="
                         f"{','.join(map(str, batches))}: every value must be >= 1")
    print(json.dumps(bench_decode(cfg, lens, batches, recurrence=_RECURRENCE.value, dtype=DTYPE.value), indent=1))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}; prompts go in --prompt=...")
    if _BENCH.value:
        return _bench()
    from parcae_jax.infer.generator import Generator
    from parcae_jax.infer.sampling import Sampling

    if not _PROMPT.value:
        raise UsageError("pass at least one --prompt=TEXT")
    sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    try:
        stop = tuple(int(s) for s in _STOP.value) if _STOP.value is not None else None
    except ValueError:
        raise UsageError(f"--stop_ids={','.join(_STOP.value)}: give token ids (integers)") from None
    cfg, params, tokenizer, seed = trained_model.load()
    gen = Generator(cfg, params, recurrence=_RECURRENCE.value, strategy=_STRATEGY.value,
                    exit_rule=_EXIT.value, exit_threshold=_EXIT_THRESHOLD.value, dtype=cfg.dtype)
    prompts = [_encode(tokenizer, p, cfg.vocab_size) for p in _PROMPT.value]
    t0 = time.perf_counter()
    out = gen.generate(prompts, _MAX_NEW.value, sampling, stop_ids=stop if stop is not None else (tokenizer.eod_id,),
                       seed=seed)
    seconds = time.perf_counter() - t0
    texts = [tokenizer.decode(t) for t in out.tokens]
    if _JSON.value:
        print(json.dumps({"completions": texts, "tokens": out.tokens, "stopped": out.stopped,
                          "mean_depth": out.mean_depth, "recurrence": gen.recurrence, "seconds": seconds,
                          "tokens_per_s": sum(map(len, out.tokens)) / seconds}))
    else:
        for prompt, text in zip(_PROMPT.value, texts):
            print(prompt + text)


def run() -> None:
    """The `parcae-generate` command."""
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
