"""Metrics out: TensorBoard events, WORKDIR/metrics.jsonl and one console line per log step.

On resume, lines of metrics.jsonl after the restored step are dropped first (and a torn
last line from a crash mid-write), so the file always describes one run, step by step.
A gs:// workdir gets both files uploaded whole from a local staging copy (storage.Mirror).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from absl import logging

from parcae_jax.runtime.run_dir import LOGS, METRICS, TENSORBOARD, RunDir
from parcae_jax.storage import Mirror, check_writable, is_remote

# Dense bfloat16 peak FLOP/s per chip, for MFU (no entry: MFU is not reported).
PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12), ("NVIDIA H200", 989e12), ("NVIDIA H100", 989e12), ("NVIDIA GH200", 989e12),
    ("NVIDIA A100", 312e12), ("NVIDIA B200", 2250e12), ("NVIDIA L4", 121e12),
)


def peak_flops(device_kind: str) -> float | None:
    for prefix, peak in PEAK_FLOPS:
        if device_kind.startswith(prefix):
            return peak
    return None


def _line(step: int, total: int, m: dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    if "loss" in m:
        parts.append(f"loss {m['loss']:.4f} (ppl {math.exp(min(m['loss'], 50)):.2f})")
    for key, fmt in (("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"), ("tokens_per_sec", "{:,.0f} tok/s"),
                     ("step_time_s", "{:.3f} s/step"), ("mfu", "mfu {:.1%}"), ("depth_mean", "depth {:.2f}"),
                     ("rho", "rho {:.4f}"), ("state_norm", "|x| {:.2f}"), ("skipped_total", "skipped {:.0f}")):
        if key in m:
            parts.append(fmt.format(m[key]))
    parts += [f"{k} {v:.4f}" for k, v in m.items() if k.startswith("eval/")]
    return " | ".join(parts)


def eval_key(arch: str, recurrence: int) -> str:
    """The metric a run logs its validation loss under: `eval/loss_r{R}` for a Parcae evaluated
    at R recurrences, `eval/loss` for a GPT."""
    return f"eval/loss_r{recurrence}" if arch == "parcae" else "eval/loss"


def read_rows(workdir: str) -> list[dict]:
    """Every row of WORKDIR/metrics.jsonl (local or gs://), [] without one; a torn last line is
    dropped, as on resume."""

    path = RunDir(workdir).metrics
    return [json.loads(line) for line in _kept_lines(path.read_text(), math.inf)] if path.exists() else []


def append_row(workdir: str, row: dict) -> None:
    """Adds one row to WORKDIR/metrics.jsonl (local or gs://) outside a run: an evaluation made
    after training ended. Not for a live run, whose MetricsWriter owns the file."""
    path = RunDir(workdir).metrics
    text = path.read_text() if path.exists() else ""
    path.write_text(text + ("" if not text or text.endswith("\n") else "\n") + json.dumps(row) + "\n")


def _kept_lines(text: str, resume_step: int) -> list[str]:
    """The rows of a metrics.jsonl up to resume_step, one per step (the last written wins), in
    step order. A torn last line (a crash mid-write) is dropped; any other line that is not a
    row with an integer step is dropped with a warning naming its line number."""
    lines = text.splitlines()
    by_step: dict[int, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = row["step"]
            if type(step) is not int:
                raise TypeError(step)
        except (json.JSONDecodeError, KeyError, TypeError):
            if number == len(lines):
                logging.warning("metrics.jsonl: dropping a torn last line (%d bytes)", len(line))
            else:
                logging.warning("metrics.jsonl: line %d is not a metrics row; dropped", number)
            continue
        if step in by_step:
            logging.warning("metrics.jsonl: step %d appears again at line %d; the later row is kept", step, number)
        if step <= resume_step:
            by_step[step] = line + "\n"
    return [by_step[s] for s in sorted(by_step)]




def check_outputs(workdir: str) -> None:
    """One line now, before a run restores or compiles anything, for a folder MetricsWriter
    could not write in (TensorBoard's writer would raise a traceback later)."""
    if not is_remote(workdir):
        check_writable(os.path.join(workdir, TENSORBOARD))


class MetricsWriter:
    """metrics.jsonl and TensorBoard events in the workdir (local or gs://, via storage.Mirror)."""

    def __init__(self, workdir: str, resume_step: int, total_steps: int, enabled: bool = True, wandb_config=None,
                 run_config: dict | None = None):
        self.enabled, self.total = enabled, total_steps
        self.tb = self.wandb = None
        if not enabled:
            return
        self.mirror = Mirror(workdir)
        self.mirror.fetch(METRICS)
        self.path = os.path.join(self.mirror.local, METRICS)
        events = os.path.join(self.mirror.local, TENSORBOARD)
        if os.path.exists(self.path):  # drop what a killed run logged past its last checkpoint
            with open(self.path) as f:
                kept = _kept_lines(f.read(), resume_step)
            with open(self.path + ".tmp", "w") as f:  # write, then rename: never half a file
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(events)
        if wandb_config is not None and wandb_config.project:
            self.wandb = _start_wandb(wandb_config, workdir, self.mirror.local, run_config)
        self.mirror.sync(force=True)

    @property
    def local_dir(self) -> str:
        """A local folder inside the workdir (or uploaded to it): for traces and other outputs."""
        return os.fspath(self.mirror.local)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        m = {k: float(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **m}) + "\n")
        for k, v in m.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(m, step=step)
        self.mirror.sync()
        print(_line(step, self.total, m), flush=True)

    def sync(self) -> None:
        """Uploads now (a gs:// workdir): called with every checkpoint, so that the remote
        metrics.jsonl holds every row up to any step a run can resume from."""
        if self.tb is not None:
            self.mirror.sync(force=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()
            self.mirror.close()


def _start_wandb(wb, workdir: str, local: str, run_config: dict | None):
    """A W&B run whose id is derived from the workdir, so a resumed run continues the same one."""
    import hashlib

    import wandb

    run_id = hashlib.sha256(os.fspath(workdir).rstrip("/").encode()).hexdigest()[:16]
    name = wb.name or os.path.basename(os.fspath(workdir).rstrip("/"))
    return wandb.init(project=wb.project, entity=wb.entity, name=name, id=run_id, resume="allow", dir=os.fspath(local),
                      config=run_config, mode=wb.mode, settings=wandb.Settings(console="off", quiet=True))


def slow_hosts(seconds: list[float], step_time_s: float, factor: float = 2.0) -> list[tuple[int, float, float]]:
    """(process, its seconds, the median) for each process whose per-step host time (waiting
    for input) is over `factor` x the median and over a tenth of the step: the host the
    others are waiting for in every collective."""
    median = sorted(seconds)[len(seconds) // 2]
    return [(i, s, median) for i, s in enumerate(seconds) if s > factor * median and s > 0.1 * step_time_s]


class ProcessLog:
    """WORKDIR/logs/process_<i>.log, one per process: its start-up line, every warning and error
    it logs, and the step lines. Only process 0 writes to the console (the others' consoles
    keep errors only), so on a pod each host's own story is in its file."""

    def __init__(self, workdir: str, pid: int, nproc: int, header: str):
        import logging as std_logging

        self.mirror = Mirror(os.path.join(os.fspath(workdir), LOGS))
        name = f"process_{pid}.log"
        os.makedirs(self.mirror.local, exist_ok=True)
        self.mirror.fetch(name)  # a resumed run appends
        self.handler = std_logging.FileHandler(os.path.join(self.mirror.local, name))
        self.handler.setLevel(std_logging.WARNING)
        self.handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(module)s: %(message)s"))
        std_logging.getLogger("absl").addHandler(self.handler)
        if pid != 0:
            logging.get_absl_handler().setLevel(std_logging.ERROR)
        self.line(f"process {pid} of {nproc}: {header}")
        self.mirror.sync(force=True)

    def line(self, text: str) -> None:
        self.handler.stream.write(text + "\n")
        self.handler.flush()

    def step(self, step: int, total: int, m: dict[str, Any]) -> None:
        self.line(_line(step, total, {k: float(v) for k, v in m.items()}))
        self.mirror.sync()

    def close(self) -> None:
        import logging as std_logging

        std_logging.getLogger("absl").removeHandler(self.handler)
        self.handler.close()
        self.mirror.close()
