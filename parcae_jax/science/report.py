"""All of the paper's measurable claims at one scale, into one folder with a Markdown report.

    python -m parcae_jax.commands.report --preset=toy --out_dir=DIR

Runs, each stage resumable (a second call reuses what is finished):
1. compare: Parcae against its GPT twin at equal parameters and tokens (science/compare.py);
2. test_time: that Parcae run's validation loss at T = 1 .. 2 x mean_recurrence and the
   saturating-exponential fit (science/recurrence_curve.py);
3. sweep: the preset's recurrence x FLOP grid, trained and fitted (science/sweep.py);
4. stability: injection variants over learning rates (science/stability.py);
then writes the report as README.md in DIR (a folder's page on code hosts): every figure,
every fitted number, the wall time of each stage, and for each claim whether this scale
reproduces it, by the rules in `verdicts`.

The toy preset is the toy sweep's model (configs/sweeps/toy.py: width 64, 1/2/1 layers,
128-token sequences) on the embedded corpus, sized to finish on a 2-core CPU in well under
40 minutes (README). Bad input is one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time

from parcae_jax.runtime.run_dir import RunDir


@dataclasses.dataclass(frozen=True)
class Preset:
    sweep: str  # a shipped sweep: its base and `set` are every stage's model and data
    compare_steps: int
    stability_variants: tuple[str, ...]
    stability_multipliers: tuple[float, ...]
    stability_steps: int


PRESETS = {"toy": Preset(sweep="toy", compare_steps=600,
                         stability_variants=("diagonal", "linear", "add", "diagonal-no-prelude-norm"),
                         stability_multipliers=(1.0, 8.0, 64.0), stability_steps=100),
           "smoke": Preset(sweep="smoke", compare_steps=8,
                           stability_variants=("diagonal", "linear"), stability_multipliers=(1.0, 64.0),
                           stability_steps=12)}


def _base(sweep):
    """The sweep's base config with its `set` overrides: the model every stage trains."""
    from parcae_jax.science.grid import assign
    from parcae_jax.training import config_files

    config = config_files.load(config_files.shipped(sweep.base), flag="base")
    for key, value in sweep.get("set") or ():
        assign(config, key, value)
    return config


def verdicts(compare: dict, test_time: dict, fit: dict, stability: dict) -> dict[str, str]:
    """One sentence per claim: what this scale shows, by fixed rules (not tuned to agree)."""
    out = {}
    runs = stability["runs"]
    diverged = lambda variants: {r["lr_multiplier"] for r in runs if r["variant"] in variants  # noqa: E731
                                 and r["diverged_at"] is not None}
    diagonal, others = diverged(("diagonal",)), diverged(("linear", "add"))
    if others - diagonal:
        out["stability"] = (f"reproduced: at learning-rate multipliers {sorted(others - diagonal)} linear or additive "
                            f"injection diverged while diagonal trained (diagonal diverged at {sorted(diagonal)})")
    elif not diagonal and not others:
        out["stability"] = "not shown at this scale: no variant diverged at any learning rate on the grid"
    else:
        out["stability"] = (f"not reproduced at this scale: diagonal diverged at {sorted(diagonal)}, linear or "
                            f"additive at {sorted(others)}")
    lowest = min(r["lr_multiplier"] for r in runs)
    out["state_norms"] = "largest state norm at the lowest rate: " + ", ".join(
        f"{r['variant']} {r['max_state_norm']:.3g}" for r in runs if r["lr_multiplier"] == lowest)
    spikes = {r["name"]: len(r["spikes"]) for r in runs if r["spikes"]}
    out["spikes"] = f"loss spikes before divergence: {spikes}" if spikes else "no loss spikes before divergence"
    law = fit.get("laws", {}).get("recurrence", {})
    if "values" in law:
        lo, hi = law["ci95"]["a"]
        a = law["values"]["a"]
        grows = "grows" if lo > 0 else ("shrinks" if hi < 0 else "is not resolved")
        out["scaling"] = (f"the compute-optimal recurrence {grows} with compute: exponent {a:.2f}, 95% interval "
                          f"[{lo:.2f}, {hi:.2f}] (paper 0.40)")
    else:
        out["scaling"] = f"no power law: {law.get('error', 'no fit')}"
    tt = test_time.get("fit")
    if tt:
        v, r2 = tt["values"], tt["r2"]
        t95 = math.log(20) / v["kappa"]
        out["test_time"] = (f"{'reproduced' if r2 > 0.9 else 'weak'}: "
                            f"L(T) = {v['L_inf']:.3f} + {v['A']:.3f} exp(-{v['kappa']:.2f} T), "
                            f"R^2 = {r2:.3f}; 95% of the fall is reached at T = {t95:.1f} "
                            f"(training mean {test_time['mean_recurrence']})")
    else:
        out["test_time"] = f"no fit: {test_time.get('fit_error')}"
    d = compare.get("loss_difference")
    out["parcae_vs_gpt"] = ("no losses" if d is None else
                            f"Parcae {'lower' if d < 0 else 'higher'} by {abs(d):.4f} nats at "
                            f"{compare['params_ratio']:.3f}x the GPT's parameters and equal tokens")
    return out


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def _num(value, spec: str) -> str:
    """A number in a table cell; "-" for a value a stage could not produce (None)."""
    return "-" if value is None else format(value, spec)


def markdown(preset: str, stages: dict, times: dict, verdict: dict) -> str:
    """The report: numbers and figures of every stage (paths relative to the report)."""
    c, t, f, s = stages["compare"], stages["test_time"], stages["fit"], stages["stability"]
    lines = [f"# Parcae science report: preset `{preset}`", "",
             f"Machine: {_machine()}. Wall time of each stage when it ran: "
             + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())
             + f"; total {sum(times.values()) / 60:.1f} min.", "", "## What this scale shows", ""]
    lines += [f"- **{k.replace('_', ' ')}**: {v}" for k, v in verdict.items()]
    lines += ["", "## Parcae against its GPT (equal parameters and tokens)", "", "![compare](compare/compare.png)", "",
              "| arch | parameters | tokens | FLOPs/token | validation loss |", "|---|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['params']:,} | {r['tokens']:,} | {r['flops_per_token']:.3g} | "
              f"{_num(r['val_loss'], '.4f')} |"
              for r in c["runs"]]
    lines += ["", "## Test-time scaling", "", "![test time](test_time/test_time.png)", "",
              "| T | loss | bits/byte |", "|---|---|---|"]
    lines += [f"| {p['T']} | {p['loss']:.4f} | {p['bits_per_byte']:.4f} |" for p in t["points"]]
    if t.get("fit"):
        v, e = t["fit"]["values"], t["fit"]["stderr"]
        lines += ["", "Fit: " + ", ".join(f"{k} = {v[k]:.4f} ± {e[k]:.4f}" for k in ("L_inf", "A", "kappa"))
                  + f", R² = {t['fit']['r2']:.4f}."]
    lines += ["", "## Recurrence x FLOPs sweep", "", "![isoflop](sweep/fit/isoflop.png)", "",
              "![optimum](sweep/fit/optimum.png)", "", "| budget | optimal recurrence | tokens at it | inside grid |",
              "|---|---|---|---|"]
    for b in f["budgets"]:
        lines.append(f"| {b['budget']:.3g} | {b['error']} | | |" if "error" in b else
                     f"| {b['budget']:.3g} | {b['recurrence_opt']:.2f} ± {b['recurrence_opt_stderr']:.2f} | "
                     f"{b['tokens_opt']:,.0f} | {'yes' if b['inside'] else 'no'} |")
    for what in ("recurrence", "tokens"):
        law = f["laws"].get(what, {})
        lines.append("" if "values" not in law else
                     f"\n{what}* ∝ C^{law['values']['a']:.3f} (95% interval {law['ci95']['a'][0]:.3f} .. "
                     f"{law['ci95']['a'][1]:.3f}; paper {f['paper'][what]:.2f}).")
    if f.get("comparison"):
        lines.append(f"\nAICc: parabolas {f['comparison']['aic_parabolas']:.1f}, additive law "
                     f"{f['comparison']['aic_additive']:.1f}: the {f['comparison']['better']} fit better.")
    lines += ["", "## Stability", "", "![stability](stability/stability.png)", "",
              "| run | diverged at step | spikes | max state norm | max rho | final loss |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['diverged_at'] if r['diverged_at'] is not None else '-'} | {len(r['spikes'])} | "
              f"{_num(r['max_state_norm'], '.3g')} | {_num(r['max_rho'], '.3f')} | {_num(r['final_loss'], '.3f')} |"
              for r in s["runs"]]
    return "\n".join(lines) + "\n"


def report(preset_name: str, out_dir: str) -> dict:
    """Every stage of the preset into out_dir, then the report (README.md); returns the verdicts."""
    from parcae_jax import storage
    from parcae_jax.science import compare, grid, recurrence_curve, stability, sweep

    preset = PRESETS[preset_name]
    sweep_config = grid.load(f"{preset.sweep}:{out_dir}/sweep")
    base = _base(sweep_config)
    folder = storage.resolve(out_dir)
    # A stage that only reads back finished runs keeps the wall time of the call that ran it.
    earlier = json.loads((folder / "report.json").read_text())["times_s"] if (folder / "report.json").exists() else {}
    times, stages = {}, {}

    def timed(name: str, fresh: bool, stage):
        t0 = time.perf_counter()
        result = stage()
        times[name] = time.perf_counter() - t0 if fresh or name not in earlier else earlier[name]
        return result

    config = base
    config.train.update(steps=preset.compare_steps, eval_every=preset.compare_steps // 4)
    fresh = not all(compare.finished(f"{out_dir}/compare/{n}", preset.compare_steps) for n in ("parcae", "gpt"))
    stages["compare"] = timed("compare", fresh, lambda: compare.compare(config, f"{out_dir}/compare"))
    stages["test_time"], _ = timed("test_time", True, lambda: recurrence_curve.measure(
        f"{out_dir}/compare/parcae", f"{out_dir}/test_time", dtype=config.model.dtype))
    points = grid.points(sweep_config)
    fresh = any(sweep.state(p) not in ("done", "diverged") for p in points)

    def run_sweep():
        sweep.run_all(points)
        sweep.fit(sweep_config, points)
        return json.loads((folder / "sweep" / "fit" / "sweep_fit.json").read_text())

    stages["fit"] = timed("sweep", fresh, run_sweep)
    runs = [f"{v}_x{m:g}" for v in preset.stability_variants for m in preset.stability_multipliers]
    fresh = not all(RunDir(str(folder / "stability" / "runs" / r)).stability_run.exists() for r in runs)
    stages["stability"] = timed("stability", fresh, lambda: stability.experiment(
        _base(sweep_config), f"{out_dir}/stability", variants=list(preset.stability_variants),
        multipliers=list(preset.stability_multipliers), steps=preset.stability_steps))
    verdict = verdicts(stages["compare"], stages["test_time"], stages["fit"], stages["stability"])
    (folder / "README.md").write_text(markdown(preset_name, stages, times, verdict))
    (folder / "report.json").write_text(json.dumps({"times_s": times, "verdicts": verdict}, indent=1))
    return verdict


if __name__ == "__main__":  # an old command line: say where the command went instead of doing nothing
    from parcae_jax.errors import moved

    moved("parcae_jax.commands.report")
