"""The flags that pick a trained model and how to run it, shared by the commands that load one
(generate, evaluate, recurrence_curve), and the loader behind them.

`--recurrences` is defined by the commands that take it (their defaults differ), through
`recurrences_flag`; `recurrence_list` reads it."""

from __future__ import annotations

from absl import flags

from parcae_jax.errors import UsageError
from parcae_jax.model.machine import inference_dtype

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training run's workdir or an official checkpoint folder.")
STEP = flags.DEFINE_integer("step", None, "Which checkpoint of a run (default: the newest).", lower_bound=0)
TOKENIZER = flags.DEFINE_string("tokenizer", None, "bytes, a tokenizer.json or a SentencePiece .model "
                                "(default: the run's, or the folder's tokenizer.json).")
SEED = flags.DEFINE_integer("seed", None, "Seeds the sampling and the loop's initial states (default: the run's "
                            "seed, so that scores equal its evaluations; 0 for an official folder).")
DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype (float32, bfloat16, fast, ...); default: the "
                            "checkpoint's on accelerators, float32 on CPU (decoding is bound by memory reads there).")


def recurrences_flag(default_help: str) -> flags.FlagHolder:
    """--recurrences for a command that takes it; `default_help` says what it defaults to."""
    return flags.DEFINE_list("recurrences", None, f"Recurrences, comma-separated (default: {default_help}).")


def recurrence_list(holder: flags.FlagHolder) -> list[int] | None:
    """The recurrences given, as positive integers (None when the flag was not given or empty:
    the command's default)."""
    if not holder.value:
        return None
    try:
        values = [int(r) for r in holder.value]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsageError(f"--recurrences={','.join(holder.value)}: give positive integers such as 1,2,4,8")
    return values


def checkpoint() -> str:
    """--checkpoint, which every such command needs."""
    if not CHECKPOINT.value:
        raise UsageError("pass --checkpoint=RUN_OR_FOLDER (a training run's workdir or an official checkpoint folder)")
    return CHECKPOINT.value


def load():
    """(ModelConfig in the chosen dtype, params, tokenizer, seed) from the flags."""
    from parcae_jax.data.tokenizer import load_tokenizer
    from parcae_jax.interop.transfer import load_model

    cfg, params, tok_spec, seed = load_model(checkpoint(), STEP.value)
    tok_spec = TOKENIZER.value or tok_spec
    if tok_spec is None:
        raise UsageError(f"{CHECKPOINT.value} names no tokenizer; pass --tokenizer=bytes|tokenizer.json|spm.model")
    tokenizer = load_tokenizer(tok_spec)
    dtype = inference_dtype(DTYPE.value)
    seed = seed if SEED.value is None else SEED.value
    return (cfg.replace(dtype=dtype) if dtype else cfg), params, tokenizer, seed
