"""Per-device memory of every published config on the machines people train on, estimated on
a CPU: the sharded train step is compiled ahead of time for a fake CPU mesh of the target's
device count (`--mode=bench --config.bench.compile_only=True`, one subprocess per point) and
XLA's memory analysis gives the bytes each device would hold. A CPU estimate: an accelerator's
compiler fuses and schedules differently (tests/test_bench.py checks that the estimate equals
the analysis of the real compiled step on the same backend).

    python -m parcae_jax.commands.memory_table --output=docs/memory_table.json
    python -m parcae_jax.commands.memory_table --targets=8xH100 --configs=140m,gpt_140m

Finished points are kept in the JSON and skipped on the next run; `--markdown` prints the
README table from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

CONFIGS = ("140m", "370m", "770m", "1p3b", "gpt_140m", "gpt_370m", "gpt_770m", "gpt_1p3b")
GLOBAL_BATCH = 256  # sequences of 2048 tokens: the published recipe's batch


@dataclasses.dataclass(frozen=True)
class Target:
    """A machine: its chip count, memory per chip, and the layout we suggest for it."""

    name: str
    devices: int
    hbm_gib: float
    micro_per_device: int  # sequences per device per micro-batch; the rest is accumulation
    smaller_micro: tuple[tuple[str, int], ...] = ()  # (config, micro_per_device) where the default does not fit

    def layout(self, config: str) -> dict:
        per_device = GLOBAL_BATCH // self.devices
        micro = max(1, per_device // dict(self.smaller_micro).get(config, self.micro_per_device))
        return {"mesh": (1, self.devices, 1), "per_device_batch": per_device, "microbatches": micro}


TARGETS = {t.name: t for t in (
    # one node, FSDP over the 8 GPUs; gpt_1p3b at 8 sequences per micro-batch needs 105% of HBM
    Target("8xH100", 8, 80, 8, smaller_micro=(("gpt_1p3b", 4),)),
    Target("v5p-64", 32, 95, 8),        # 32 chips (v5p names count TensorCores, 2 per chip)
    Target("v5e-256", 256, 16, 1),      # 256 chips of 16 GiB
)}

def overrides(config: str, target: Target) -> list[str]:
    """The flags of one point: bf16, chunked loss, the target's mesh and batch layout, and the
    loop's remat policy and scan that "auto" picks on an accelerator (this compiles on CPU
    devices)."""
    lay = target.layout(config)
    return [f"--config.mesh.shape={lay['mesh']}", f"--config.train.batch_size={GLOBAL_BATCH}",
            f"--config.train.microbatches={lay['microbatches']}", "--config.model.dtype=bfloat16",
            "--config.model.loss_chunk=512", "--config.model.remat_policy=full", "--config.model.scan_unroll=none",
            "--config.bench.compile_only=True"]


def estimate(config: str, target: Target) -> dict:
    """Compiles one point in a subprocess with `target.devices` fake CPU devices."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={target.devices}",
           "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "parcae_jax.main", f"--config={config}", "--mode=bench", *overrides(config, target)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{config} on {target.name}: {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"config": config, "target": target.name, **target.layout(config), **result}


def markdown(points: list[dict]) -> str:
    rows = ["| config | machine | mesh (data, fsdp, tensor) | batch per device (micro-batches) | "
            "state MiB | temporaries MiB | total GiB | of HBM |", "|---|---|---|---|---|---|---|---|"]
    order = {(t, c): (i, j) for i, t in enumerate(TARGETS) for j, c in enumerate(CONFIGS)}
    for p in sorted(points, key=lambda p: order.get((p["target"], p["config"]), (len(TARGETS), 0))):
        hbm = TARGETS[p["target"]].hbm_gib
        total = p["total_bytes"] / 2**30
        rows.append(f"| {p['config']} | {p['target']} | {tuple(p['mesh'])} | {p['per_device_batch']} "
                    f"({p['microbatches']}) | {p['argument_bytes'] / 2**20:,.0f} | {p['temp_bytes'] / 2**20:,.0f} | "
                    f"{total:.1f} | {total / hbm:.0%} |")
    return "\n".join(rows)


def extend(path: Path, targets: list[str], configs: list[str]) -> list[dict]:
    """The points in `path`, with every (target, config) not yet there estimated and written
    back after each one (printed as it finishes): an interrupted table resumes."""
    points = json.loads(path.read_text()) if path.exists() else []
    for target in (TARGETS[t] for t in targets):
        for config in configs:
            lay = target.layout(config)
            if any(p["config"] == config and p["target"] == target.name and p["microbatches"] == lay["microbatches"]
                   for p in points):
                continue  # finished on an earlier run
            # a point of an older layout is replaced
            points = [p for p in points if not (p["config"] == config and p["target"] == target.name)]
            points.append(estimate(config, target))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(points, indent=1) + "\n")
            print(json.dumps(points[-1]), flush=True)
    return points


if __name__ == "__main__":  # an old command line: say where the command went instead of doing nothing
    from parcae_jax.errors import moved

    moved("parcae_jax.commands.memory_table")
