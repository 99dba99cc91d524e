"""Downstream evaluation with lm-evaluation-harness over our model (harness.py): local task
files checked line by line, tasks built before the model loads, every task at every
recurrence, and the table of headline metrics."""

from __future__ import annotations

import json
import os

from parcae_jax.errors import UserError


class TaskFileError(UserError, ValueError):
    """A local task file that cannot be used (one line, names the file and line)."""


def local_task(path: str) -> dict:
    """A task YAML as the config dict lm-eval takes, its relative data files made absolute and
    every line of its local JSONL files parsed (TaskFileError names the first bad one)."""
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as e:
        raise TaskFileError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise TaskFileError(f"{path}: not a task YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict) or "task" not in config:
        raise TaskFileError(f"{path}: a task YAML needs a `task:` name")
    if "include" not in config:  # an included base file may supply the rest: lm-eval checks that one
        needed = ["dataset_path", "doc_to_text", "doc_to_target"]
        needed += ["doc_to_choice"] if config.get("output_type") == "multiple_choice" else []
        missing = [k for k in needed
                   if config.get(k) is None and not (k == "dataset_path" and "custom_dataset" in config)]
        if missing:
            raise TaskFileError(f"{path}: a task YAML needs `{missing[0]}:` (lm-eval's task fields: "
                                f"{', '.join(needed)})")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        here = os.path.dirname(os.path.abspath(path))
        resolve = lambda p: p if "://" in p or os.path.isabs(p) else os.path.join(here, p)  # noqa: E731
        files = {k: resolve(v) for k, v in files.items()} if isinstance(files, dict) else \
            [resolve(p) for p in ([files] if isinstance(files, str) else files)]
        config["dataset_kwargs"]["data_files"] = files
        for file in (files.values() if isinstance(files, dict) else files):
            _check_jsonl(file)
    return config


def _check_jsonl(path: str) -> None:
    if not path.endswith((".jsonl", ".json")) or "://" in path:
        return
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskFileError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove that line") from None
                if not isinstance(doc, dict):
                    raise TaskFileError(f"{path}:{n}: a document must be a JSON object, got {type(doc).__name__}")
    except OSError as e:
        raise TaskFileError(f"{path}: {e.strerror}") from None


def build_tasks(tasks: list, manager) -> None:
    """Builds each task as lm-eval will (its name looked up, its config checked, its dataset
    loaded or fetched) before any model is loaded: what lm-eval refuses is one line naming
    the task, instead of a traceback after the model was loaded."""
    for task in tasks:
        name = task["task"] if isinstance(task, dict) else task
        try:
            manager.load([task])
        except KeyError:
            raise TaskFileError(f"--tasks: {name!r} is not a task lm-eval knows; check the name (python -m "
                                "lm_eval ls tasks lists them) or pass a task YAML path") from None
        except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many kinds for one cause
            why = (str(e).strip().splitlines() or [""])[0][:200] or "no message"
            fix = ("check the network, or set HF_DATASETS_OFFLINE=1 with the dataset in its cache"
                   if isinstance(e, (ConnectionError, OSError)) or "offline" in why.lower() or "reach" in why.lower()
                   else "fix the task's config")
            raise TaskFileError(f"task {name}: lm-eval cannot build it ({type(e).__name__}: {why}); {fix}") from None


def headline(task_results: dict) -> dict[str, float]:
    """The task's numeric metrics (`acc,none` -> `acc`); stderr and the sample count left out."""
    return {k.split(",")[0]: float(v) for k, v in task_results.items()
            if isinstance(v, (int, float)) and "stderr" not in k and k.split(",")[0] not in ("alias", "sample_len")}


def table(scores: dict[str, dict[int, dict[str, float]]], recurrences: list[int]) -> str:
    """Markdown: a row per task and metric, a column per recurrence."""
    lines = ["| task | metric | " + " | ".join(f"R={r}" for r in recurrences) + " |",
             "|---|---|" + "---|" * len(recurrences)]
    for task, by_r in scores.items():
        for metric in by_r[recurrences[0]]:
            lines.append(f"| {task} | {metric} | " + " | ".join(f"{by_r[r][metric]:.4f}" for r in recurrences) + " |")
    return "\n".join(lines)


def evaluate(cfg, params, tokenizer, tasks: list, recurrences: list[int], *, batch_size: int = 16, seed: int = 0,
             limit: int | None = None, num_fewshot: int | None = None, manager=None) -> dict:
    """Every task at every recurrence: {"recurrences", "scores": {task: {R: {metric: value}}},
    "scoring_tokens_per_s": {R: tokens through the scored forward per second, compiles
    included}, "lm_eval": {R: lm-eval's results}}. tasks: lm-eval names or local_task dicts; manager: an
    lm-eval TaskManager (indexing its registry takes seconds: pass the one build_tasks used)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from parcae_jax.infer.harness import HarnessLM

    manager = manager or TaskManager()
    scores: dict = {}
    raw: dict = {}
    speed: dict = {}
    for r in recurrences:
        lm = HarnessLM(cfg, params, tokenizer, recurrence=r, batch_size=batch_size, seed=seed)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=False)
        raw[r] = out["results"]
        speed[r] = lm.scored_tokens / lm.scoring_seconds if lm.scoring_seconds else None
        for task, res in out["results"].items():
            scores.setdefault(task, {})[r] = headline(res)
    return {"recurrences": recurrences, "scores": scores, "scoring_tokens_per_s": speed, "lm_eval": raw}
