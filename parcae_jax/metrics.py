"""Metrics out: TensorBoard events, WORKDIR/metrics.jsonl and one console line per log step.

On resume, lines of metrics.jsonl after the restored step are dropped first, so the file
always describes one run, step by step.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


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


class MetricsWriter:
    def __init__(self, workdir: str, resume_step: int, total_steps: int, enabled: bool = True):
        self.enabled, self.total = enabled, total_steps
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        if os.path.exists(self.path):  # drop what a killed run logged past its last checkpoint
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        m = {k: float(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **m}) + "\n")
        for k, v in m.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()
        print(_line(step, self.total, m), flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
