"""Test-time scaling: validation loss against the number of recurrences T, and its fit
(science/recurrence_curve.py).

    python -m parcae_jax.commands.recurrence_curve --checkpoint=RUN_OR_FOLDER [--step=N] \\
        [--recurrences=1,2,...] [--val_batches=N] [--val_batch_size=B] [--out_dir=DIR]

Evaluates one checkpoint (a training run's workdir, or an official folder with
--data_path=PREPARED_DIR) at T = 1 .. 2 x mean_recurrence (or --recurrences) on the first
validation batches in storage order (by default the run's own), with the run's evaluation
states: the point at T = R is the run's own `eval/loss_rR`. Writes test_time.json,
test_time.csv and test_time.png to --out_dir (default RUN/science).
"""

from __future__ import annotations

import json

from absl import flags

from parcae_jax.commands import cli, trained_model
from parcae_jax.commands.science_flags import OUT_DIR
from parcae_jax.commands.trained_model import DTYPE, SEED, STEP, TOKENIZER
from parcae_jax.runtime.run_dir import RunDir
from parcae_jax.science.recurrence_curve import OFFICIAL_EVAL, measure

_RECURRENCES = trained_model.recurrences_flag("1 .. 2 x mean_recurrence")
_VAL_BATCHES = flags.DEFINE_integer("val_batches", None, "Validation batches (the first, in storage order); default: "
                                    f"the run's train.eval_batches ({OFFICIAL_EVAL[0]} for an official folder).",
                                    lower_bound=1)
_VAL_BATCH = flags.DEFINE_integer("val_batch_size", None, "Sequences per validation batch; default: the run's "
                                  f"train.batch_size ({OFFICIAL_EVAL[1]} for an official folder).", lower_bound=1)
_DATA_PATH = flags.DEFINE_string("data_path", None, "A prepared corpus (commands.prepare) to validate on; "
                                 "default: the run's own data. Needed for an official folder.")


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    checkpoint = trained_model.checkpoint()
    result, paths = measure(checkpoint, OUT_DIR.value or RunDir(checkpoint).science, step=STEP.value,
                            recurrences=trained_model.recurrence_list(_RECURRENCES), val_batches=_VAL_BATCHES.value,
                            val_batch_size=_VAL_BATCH.value, data_path=_DATA_PATH.value, tokenizer=TOKENIZER.value,
                            dtype=DTYPE.value, seed=SEED.value)
    print(json.dumps({**{k: result[k] for k in ("step", "fit", "fit_error")}, "files": paths}))


def run() -> None:
    """The `parcae-test-time` command."""
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
