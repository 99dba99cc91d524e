"""Figures of the science commands (matplotlib, headless): small PNGs that a README can hold."""

from __future__ import annotations

import math
from typing import Callable

import matplotlib

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
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


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
