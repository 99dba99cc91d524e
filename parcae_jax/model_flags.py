"""The flags that pick a trained model and how to run it, shared by `generate` and `evaluate`,
and the one loader behind them (bad input: one line, exit 2)."""

from __future__ import annotations

import sys

from absl import flags

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training run's workdir or an official checkpoint folder.")
STEP = flags.DEFINE_integer("step", None, "Which checkpoint of a run (default: the newest).")
TOKENIZER = flags.DEFINE_string("tokenizer", None, "bytes, a tokenizer.json or a SentencePiece .model "
                                "(default: the run's, or the folder's tokenizer.json).")
SEED = flags.DEFINE_integer("seed", None, "Seeds the sampling and the loop's initial states (default: the run's "
                            "seed, so that scores equal its evaluations; 0 for an official folder).")
RECURRENCES = flags.DEFINE_list("recurrences", None, "Recurrences to evaluate at, comma-separated "
                                "(default: evaluate, mean_recurrence; science.test_time, 1 .. 2 x mean_recurrence).")
DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype (float32, bfloat16, fast, ...); default: the "
                            "checkpoint's on accelerators, float32 on CPU (decoding is bound by memory reads there).")


def fail(message: str):
    """One line on stderr and exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load():
    """(ModelConfig in the chosen dtype, params, tokenizer, seed) from the flags, or fail()."""
    import jax

    from parcae_jax.data.tokenizer import load_tokenizer
    from parcae_jax.errors import user_errors
    from parcae_jax.transfer import load_model

    if not CHECKPOINT.value:
        fail("pass --checkpoint=RUN_OR_FOLDER (a training run's workdir or an official checkpoint folder)")
    try:
        cfg, params, tok_spec, seed = load_model(CHECKPOINT.value, STEP.value)
        tok_spec = TOKENIZER.value or tok_spec
        if tok_spec is None:
            fail(f"{CHECKPOINT.value} names no tokenizer; pass --tokenizer=bytes|tokenizer.json|spm.model")
        tokenizer = load_tokenizer(tok_spec)
        dtype = DTYPE.value or ("float32" if jax.default_backend() == "cpu" else None)
        seed = seed if SEED.value is None else SEED.value
        return (cfg.replace(dtype=dtype) if dtype else cfg), params, tokenizer, seed
    except user_errors() as e:  # the project's one list of user errors (no readable checkpoint included)
        fail(str(e).splitlines()[0])
