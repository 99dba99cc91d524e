"""Test-time scaling: validation loss against the number of recurrences T, and its fit.

    python -m parcae_jax.commands.recurrence_curve --checkpoint=RUN_OR_FOLDER [--step=N] \\
        [--recurrences=1,2,...] [--val_batches=N] [--val_batch_size=B] [--out_dir=DIR]

Evaluates one checkpoint (a training run's workdir, or an official folder with
--data_path=PREPARED_DIR) at T = 1 .. 2 x mean_recurrence (or --recurrences) on the first
validation batches in storage order (by default the run's own: train.eval_batches batches of
train.batch_size), with the loop's initial state from the run's seed as training's
evaluations draw it: the point at T = mean_recurrence is the run's own `eval/loss_r{T}`.
Reports nats per token and bits per byte of the targets' text, fits
L(T) = L_inf + A * exp(-kappa * T) (science/fits.py), and writes test_time.json, test_time.csv
and test_time.png to --out_dir (default RUN/science). A GPT has no recurrence: one point,
drawn as a flat line, so tables of both line up. Bad input is one line on stderr and exit
code 2.
"""

from __future__ import annotations

import json
import math
import os

from parcae_jax.errors import UserError
from parcae_jax.science.tables import write_csv

OFFICIAL_EVAL = (8, 8)  # (batches, sequences each) for an official folder, which records no evaluation


def target_bytes(batches: list[dict], tokenizer) -> int:
    """UTF-8 bytes of the scored targets' text (the byte tokenizer: one per byte token)."""
    import numpy as np

    from parcae_jax.data.tokenizer import ByteTokenizer

    total = 0
    for b in batches:
        for row in np.asarray(b["targets"]):
            row = row[row >= 0]
            total += int((row < 256).sum()) if isinstance(tokenizer, ByteTokenizer) else \
                len(tokenizer.decode(row.tolist()).encode("utf-8"))
    return total


def losses(cfg, params, batches: list[dict], recurrences: list[int], seed: int, document_masking: bool = False):
    """[(T, mean nats per target token, tokens)] on `batches`, one compile for every T."""
    import jax
    import jax.numpy as jnp

    from parcae_jax.model import build
    from parcae_jax.training.step import make_eval_step

    step = jax.jit(make_eval_step(build(cfg), seed=seed, document_masking=document_masking))
    out = []
    for T in recurrences:
        parts = [step(params, b, jnp.int32(T)) for b in batches]
        total, count = (sum(float(p[i]) for p in parts) for i in (0, 1))
        out.append((T, total / max(count, 1.0), int(count)))
    return out


def curve(points: list[tuple[int, float, int]], n_bytes: int, arch: str, mean_recurrence: int) -> dict:
    """The JSON result: the points (with bits per byte) and the fit, or why there is none."""
    from parcae_jax.science import fits

    tokens = points[0][2]
    rows = [{"T": T, "loss": loss, "bits_per_byte": loss * tokens / math.log(2) / n_bytes if n_bytes else None}
            for T, loss, _ in points]
    result = {"arch": arch, "mean_recurrence": mean_recurrence if arch == "parcae" else None,
              "tokens": tokens, "bytes": n_bytes, "points": rows, "fit": None, "fit_error": None}
    if arch != "parcae":
        result["fit_error"] = "a GPT has no recurrence: one point"
        return result
    try:
        result["fit"] = fits.saturating_exponential([r["T"] for r in rows], [r["loss"] for r in rows]).to_json()
    except fits.FitError as e:
        result["fit_error"] = str(e)
    return result


def write(result: dict, out: str) -> dict[str, str]:
    """test_time.{json,csv,png} in `out` (local or gs://); returns their paths."""
    from parcae_jax import storage
    from parcae_jax.science import plots

    folder = storage.resolve(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {ext: str(folder / f"test_time.{ext}") for ext in ("json", "csv", "png")}
    (folder / "test_time.json").write_text(json.dumps(result, indent=1))
    fitted = plots.saturating(result["fit"])
    write_csv(folder / "test_time.csv", ["T", "loss", "bits_per_byte", "fit"],
              ([r["T"], r["loss"], r["bits_per_byte"], fitted(r["T"]) if fitted else ""] for r in result["points"]))
    plots.test_time(result, paths["png"])
    return paths


class TestTimeError(UserError, ValueError):
    """A request that cannot be measured (one line, names the fix)."""


def _load(checkpoint: str, step: int | None, tokenizer: str | None, data_path: str | None, dtype: str | None,
          seed: int | None):
    """(cfg, params, tokenizer, data config, seed, step, (eval batches, batch size)) of a run or an
    official folder (which records no evaluation: OFFICIAL_EVAL)."""
    import ml_collections

    from parcae_jax.data.tokenizer import load_tokenizer
    from parcae_jax.interop import transfer
    from parcae_jax.model.config import ModelConfig
    from parcae_jax.model.machine import inference_dtype
    from parcae_jax.training import defaults

    data = defaults.data_config()
    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        cfg, params, tok_spec, _ = transfer.load_model(checkpoint)
        found, evaluation = None, OFFICIAL_EVAL
        if not data_path:
            raise TestTimeError(f"{checkpoint} is an official folder, which holds no validation data; pass "
                                "--data_path=DIR, a corpus prepared with its tokenizer "
                                "(python -m parcae_jax.commands.prepare)")
    else:
        found, saved, params = transfer.restore_run(checkpoint, step)
        cfg = ModelConfig.from_mapping(saved["model"])
        seed = int(saved.get("seed", 0)) if seed is None else seed
        data = ml_collections.ConfigDict({**data.to_dict(), **saved.get("data", {})})
        tok_spec = data.tokenizer
        train = saved.get("train", {})
        evaluation = (int(train.get("eval_batches") or OFFICIAL_EVAL[0]),
                      int(train.get("batch_size") or OFFICIAL_EVAL[1]))
    seed = 0 if seed is None else seed
    tok_spec = tokenizer or tok_spec
    if tok_spec is None:
        raise TestTimeError(f"{checkpoint} names no tokenizer; pass --tokenizer=bytes|tokenizer.json|spm.model")
    if data_path:
        data.source, data.path = "prepared", data_path
    data.tokenizer = tok_spec
    dtype = inference_dtype(dtype)
    cfg = cfg.replace(dtype=dtype) if dtype else cfg
    return cfg, params, load_tokenizer(tok_spec, data.eod_token), data, seed, found, evaluation


def measure(checkpoint: str, out_dir: str, *, step: int | None = None, recurrences: list[int] | None = None,
            val_batches: int | None = None, val_batch_size: int | None = None, data_path: str | None = None,
            tokenizer: str | None = None, dtype: str | None = None, seed: int | None = None) -> tuple[dict, dict]:
    """(result, file paths): the test-time curve of one checkpoint, written to out_dir.
    Batches default to the run's own evaluation (train.eval_batches x train.batch_size), so the
    point at its mean recurrence is its logged eval loss. Raises TestTimeError, or the loaders'
    one-line errors, for bad input."""
    from parcae_jax.data import dataset

    if (val_batches is not None and val_batches < 1) or (val_batch_size is not None and val_batch_size < 1):
        raise TestTimeError("--val_batches and --val_batch_size must be >= 1")
    if recurrences is not None and (not recurrences or min(recurrences) < 1):
        raise TestTimeError(f"--recurrences: every T must be >= 1, got {min(recurrences, default=None)}")
    cfg, params, tok, data, seed, found, evaluation = _load(checkpoint, step, tokenizer, data_path, dtype, seed)
    val_batches, val_batch_size = val_batches or evaluation[0], val_batch_size or evaluation[1]
    if tok.vocab_size > cfg.vocab_size:
        raise TestTimeError(f"the tokenizer has {tok.vocab_size} ids but the model {cfg.vocab_size}; "
                            "pass the model's --tokenizer")
    _, val = dataset.open_splits(data, tok, progress=False)
    batches = [b for _, b in zip(range(val_batches), dataset.eval_loader(val, data, cfg.seq_len, val_batch_size))]
    if not batches:
        raise TestTimeError(f"the validation split of {data.path or data.source} holds no window of "
                            f"{cfg.seq_len + 1} tokens")
    if cfg.arch == "parcae":
        recurrences = sorted(set(recurrences)) if recurrences else list(range(1, 2 * cfg.mean_recurrence + 1))
    else:
        recurrences = [1]
    points = losses(cfg, params, batches, recurrences, seed, bool(data.document_masking))
    result = {"checkpoint": checkpoint, "step": found, "eval_batches": len(batches), "batch_size": val_batch_size,
              **curve(points, target_bytes(batches, tok), cfg.arch, cfg.mean_recurrence)}
    return result, write(result, out_dir)
