"""Figures of the science commands (matplotlib, headless): small PNGs that a README can hold."""

from __future__ import annotations

import io
import math
from typing import Callable

import matplotlib
from etils import epath

matplotlib.use("Agg")  # no display on pods and CI
import matplotlib.pyplot as plt  # noqa: E402

DPI = 100
SIZE = (5.0, 3.4)  # inches: ~30-60 KB PNGs


def saturating(fit: dict | None) -> Callable[[float], float] | None:
    """L(T) of a fitted test-time law (Fit.to_json), or None without one."""
    if not fit:
        return None
    v = fit["values"]
    return lambda T: v["L_inf"] + v["A"] * math.exp(-v["kappa"] * T)


def _save(fig, path: str) -> None:
    """A PNG at `path`, local or gs:// (through etils.epath)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    plt.close(fig)
    epath.Path(path).write_bytes(buffer.getvalue())


def test_time(result: dict, path: str) -> None:
    """Loss against T: the points, the fit and its asymptote L_inf, the training mean marked."""
    fig, ax = plt.subplots(figsize=SIZE)
    Ts = [p["T"] for p in result["points"]]
    Ls = [p["loss"] for p in result["points"]]
    if result["arch"] != "parcae":  # a GPT: one number, drawn flat so a Parcae plot can sit beside it
        ax.axhline(Ls[0], color="C0", label=f"GPT {Ls[0]:.3f}")
    else:
        ax.plot(Ts, Ls, "o", color="C0", label="validation loss")
        f = saturating(result["fit"])
        if f:
            v, grid = result["fit"]["values"], [min(Ts) + i * (max(Ts) - min(Ts)) / 200 for i in range(201)]
            ax.plot(grid, [f(T) for T in grid], "-", color="C1",
                    label=f"{v['L_inf']:.3f} + {v['A']:.2f}·exp(-{v['kappa']:.2f}T), R²={result['fit']['r2']:.3f}")
            ax.axhline(v["L_inf"], color="C1", ls=":", lw=1, label="L∞")
        ax.axvline(result["mean_recurrence"], color="gray", ls="--", lw=1, label="training mean")
    ax.set_xlabel("recurrences T at test time")
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend(fontsize=7)
    _save(fig, path)


def isoflop(rows: list[dict], analysis: dict, path: str) -> None:
    """Loss against mean recurrence, one curve per budget, each minimum inside the grid marked."""
    fig, ax = plt.subplots(figsize=SIZE)
    for i, b in enumerate(analysis["budgets"]):
        pts = sorted((r for r in rows if r["budget"] == b["budget"]), key=lambda r: r["recurrence"])
        color = f"C{i % 10}"
        ax.plot([r["recurrence"] for r in pts], [r["loss"] for r in pts], "o", color=color, ms=4,
                label=f"C = {b['budget']:.2g}")
        if "fit" in b:
            v = b["fit"]["values"]
            lo, hi = math.log(pts[0]["recurrence"]), math.log(pts[-1]["recurrence"])
            xs = [lo + (hi - lo) * j / 100 for j in range(101)]
            ax.plot([math.exp(x) for x in xs], [v["c0"] + v["c1"] * x + v["c2"] * x * x for x in xs], "-",
                    color=color, lw=1)
            if b["inside"]:  # a vertex outside the grid is an extrapolation: not drawn as an optimum
                ax.plot([b["recurrence_opt"]], [b["loss_opt"]], "*", color=color, ms=10, mec="k", mew=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean recurrence (training)")
    ax.set_ylabel("final validation loss")
    ax.legend(fontsize=7)
    _save(fig, path)


def optimum(analysis: dict, path: str) -> None:
    """The compute-optimal recurrence and tokens against the budget (log-log), with the fitted
    power laws (and the additive law's optima where it fitted)."""
    fig, axes = plt.subplots(1, 2, figsize=(SIZE[0] * 1.6, SIZE[1]))
    found = [b for b in analysis["budgets"] if "error" not in b and b["inside"]]
    for ax, what, key in ((axes[0], "recurrence", "recurrence_opt"), (axes[1], "tokens", "tokens_opt")):
        C = [b["budget"] for b in found]
        ax.plot(C, [b[key] for b in found], "o", color="C0", label="isoFLOP minima inside the grid")
        law = analysis["laws"].get(what, {})
        if "values" in law and C:
            a, log_k = law["values"]["a"], law["values"]["log_k"]
            lo, hi = law["ci95"]["a"]
            grid = [min(C) * (max(C) / min(C)) ** (j / 50) for j in range(51)]
            ax.plot(grid, [math.exp(log_k) * c ** a for c in grid], "-", color="C0",
                    label=f"∝ C^{a:.2f} [{lo:.2f}, {hi:.2f}] (paper {analysis['paper'][what]:.2f})")
        add = analysis.get("additive") or {}
        if "optima" in add:
            ax.plot([o["budget"] for o in add["optima"]], [o[key] for o in add["optima"]], "x", color="C1",
                    label="additive law's optima")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide in a decade
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel(f"optimal {what}")
        ax.legend(fontsize=6)
    _save(fig, path)


def stability(runs: list[dict], path: str) -> None:
    """Loss, state norm and rho against step: one column per variant, one line per learning
    rate, an x where a run diverged."""
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    mults = sorted({r["lr_multiplier"] for r in runs})
    fig, axes = plt.subplots(3, len(variants), figsize=(2.6 * len(variants), 6.0), sharex=True, squeeze=False)
    for col, variant in enumerate(variants):
        for r in (r for r in runs if r["variant"] == variant):
            color = f"C{mults.index(r['lr_multiplier']) % 10}"
            steps = [s["step"] for s in r["series"]]
            for row, key in enumerate(("loss", "state_norm", "rho")):
                ys = [s.get(key, float("nan")) for s in r["series"]]
                axes[row][col].plot(steps, ys, color=color, lw=0.8, label=f"lr x{r['lr_multiplier']:g}")
                if r["diverged_at"] is not None:
                    at = [y for s, y in zip(steps, ys) if s == r["diverged_at"] and math.isfinite(y)]
                    if at:
                        axes[row][col].plot([r["diverged_at"]], at[:1], "x", color=color, ms=7)
        axes[0][col].set_title(variant, fontsize=8)
        axes[1][col].set_yscale("log")
        axes[2][col].set_xlabel("step", fontsize=8)
    for row, label in enumerate(("train loss", "state norm", "rho(A_bar)")):
        axes[row][0].set_ylabel(label, fontsize=8)
    for ax in (a for line in axes for a in line):
        ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6)
    _save(fig, path)


def compare(runs: list[dict], path: str) -> None:
    """Validation loss of Parcae and its GPT against step and against training FLOPs."""
    fig, axes = plt.subplots(1, 2, figsize=(SIZE[0] * 1.6, SIZE[1]))
    for i, r in enumerate(runs):
        steps = [c["step"] for c in r["curve"]]
        losses = [c["val_loss"] for c in r["curve"]]
        per_step = r["flops"] / max(steps[-1], 1) if steps else 0
        label = f"{r['arch']} ({r['params'] / 1e6:.2f}M params)" + (
            f", R={r['mean_recurrence']}" if r["mean_recurrence"] else "")
        axes[0].plot(steps, losses, "o-", color=f"C{i}", ms=3, label=label)
        axes[1].plot([s * per_step for s in steps], losses, "o-", color=f"C{i}", ms=3, label=label)
    axes[0].set_xlabel("step (equal tokens)")
    axes[1].set_xlabel("training FLOPs")
    axes[1].set_xscale("log")
    axes[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in axes:
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=7)
    _save(fig, path)
