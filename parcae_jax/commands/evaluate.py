"""Downstream evaluation with lm-evaluation-harness, at every recurrence asked for.

    python -m parcae_jax.commands.evaluate --checkpoint=RUN_OR_FOLDER --tasks=hellaswag,arc_easy \\
        --recurrences=1,2,4,8,16 [--limit=N] [--num_fewshot=K] [--output=scores.json]

--tasks: lm-eval task names (its registry; the datasets download on first use) or paths to
task YAML files, whose `dataset_kwargs.data_files` may name local JSONL files relative to the
YAML (offline; every line is checked first, and a malformed one is named). Each task runs at
each recurrence (infer/harness.py: log-likelihoods batched by length through the jitted
forward, generation through the cached decoder). Prints one table, metric by task and
recurrence, and writes it with lm-eval's full results to --output. Computes in float32 on
CPU unless --dtype. Bad input is one line on stderr and exit code 2.

    python -m parcae_jax.commands.evaluate --bench [--bench_config=bench_cpu] [--dtype=bfloat16]

times the adapter's rolling log-likelihood of 64 synthetic documents with random weights,
batched against one call per document, and prints one JSON object (bench/harness.py).
"""

from __future__ import annotations

import json
import logging
import os

from absl import flags

from parcae_jax.commands import cli, trained_model
from parcae_jax.errors import UsageError
from parcae_jax.infer.evaluation import build_tasks, evaluate, local_task, table

_TASKS = flags.DEFINE_list("tasks", None, "lm-eval task names or task YAML paths, comma-separated.")
_RECURRENCES = trained_model.recurrences_flag("the model's mean_recurrence")
_LIMIT = flags.DEFINE_integer("limit", None, "At most this many documents per task.", lower_bound=1)
_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: the task's).", lower_bound=0)
_BATCH = flags.DEFINE_integer("eval_batch_size", 16, "Scored sequences per forward.", lower_bound=1)
_OUTPUT = flags.DEFINE_string("output", None, "Write the table and lm-eval's results here (JSON).")
_BENCH = flags.DEFINE_bool("bench", False, "Benchmark the rolling log-likelihood (bench/harness.py) instead.")
_BENCH_CONFIG = flags.DEFINE_string("bench_config", "bench_cpu", "--bench: a shipped config's name.")


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    if _BENCH.value:
        return _bench()
    if not _TASKS.value:
        raise UsageError("pass --tasks=NAME_OR_YAML[,...]")
    recurrences = trained_model.recurrence_list(_RECURRENCES)
    trained_model.checkpoint()
    if _OUTPUT.value:
        _check_writable(_OUTPUT.value)  # before the evaluation, whose results would otherwise be lost
    logging.getLogger("datasets").setLevel(logging.WARNING)  # its "JAX version ... available" on every run
    from lm_eval.tasks import TaskManager

    tasks = [local_task(t) if t.endswith((".yaml", ".yml")) else t for t in _TASKS.value]
    # lm-eval's registry takes ~10 s to index: only for tasks named from it
    manager = TaskManager(include_defaults=any(isinstance(t, str) for t in tasks))
    build_tasks(tasks, manager)
    cfg, params, tokenizer, seed = trained_model.load()
    recurrences = recurrences or [cfg.recurrence_or_mean(None)]
    if cfg.arch == "gpt" and len(recurrences) > 1:
        recurrences = recurrences[:1]  # a GPT has no loop: one column
    result = evaluate(cfg, params, tokenizer, tasks, recurrences, batch_size=_BATCH.value, seed=seed,
                      limit=_LIMIT.value, num_fewshot=_FEWSHOT.value, manager=manager)
    print(table(result["scores"], recurrences))
    if _OUTPUT.value:
        tmp = f"{_OUTPUT.value}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(tmp, _OUTPUT.value)  # whole or not at all


def _bench() -> None:
    from parcae_jax.bench.harness import bench_rolling
    from parcae_jax.model.config import ModelConfig
    from parcae_jax.model.machine import inference_dtype
    from parcae_jax.training.defaults import load_shipped, shipped_config

    if shipped_config(_BENCH_CONFIG.value) is None:
        raise UsageError(f"--bench_config={_BENCH_CONFIG.value}: not a shipped config (tiny, bench_cpu, 140m, ...)")
    cfg = ModelConfig.from_mapping(load_shipped(_BENCH_CONFIG.value).model)
    cfg = cfg.replace(dtype=inference_dtype(trained_model.DTYPE.value) or cfg.dtype)
    recurrences = trained_model.recurrence_list(_RECURRENCES) or [None]
    print(json.dumps(bench_rolling(cfg, recurrence=recurrences[0], batch_size=_BATCH.value), indent=1))


def _check_writable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"--output={path} is a directory; name a file")
    if not os.path.isdir(folder):
        raise UsageError(f"--output={path}: no such directory {folder}")
    from parcae_jax.storage import StorageError, check_writable

    try:
        check_writable(folder)  # a probe file: os.access says yes to root on a read-only mount
    except StorageError as e:
        raise UsageError(f"--output={path}: {e}") from None


def run() -> None:
    """The `parcae-evaluate` command."""
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
