"""Compute-optimal recurrence and tokens from a sweep's table (one row per finished point).

    analysis = analyse(rows)   # rows: budget, recurrence, tokens, flops_per_token, loss

1. Per budget C, the isoFLOP curve loss(recurrence) and its minimum: a parabola in
   ln(recurrence) (fits.isoflop_minimum) gives mu*(C); tokens*(C) = C / F(mu*), F the FLOPs
   per token interpolated between the grid's recurrences.
2. Power laws mu* = k C^a and tokens* = k' C^b over the budgets whose minimum lies inside
   the swept recurrences (a vertex outside is an extrapolation of the parabola, not a
   measured optimum; fits.power_law; the paper: a ~ 0.40, b ~ 0.78).
3. The additive law L = E + A mu^-alpha + B D^-beta over every point (fits.additive_law):
   its own optimum per budget (minimising L(mu, C / F(mu)) over mu) and the exponents of
   that; and which description fits the table better by AICc (parabolas: 3 parameters per
   budget; the law: 5 in all), when every budget has its parabola (the same rows on both sides).

Every stage that cannot be fitted keeps its one-line reason instead of a number.
"""

from __future__ import annotations

import math

import numpy as np

from parcae_jax.science import fits

PAPER = {"recurrence": 0.40, "tokens": 0.78}  # the paper's exponents of mu* and tokens* in C


def _aic(rss: float, n: int, k: int) -> float:
    """AICc: Akaike's criterion with the small-sample correction (n - k - 1 > 0), for least squares."""
    aic = n * math.log(max(rss, 1e-300) / n) + 2 * k
    return aic + 2 * k * (k + 1) / (n - k - 1) if n - k - 1 > 0 else math.inf


def _fpt(rows: list[dict]):
    """F(mu): FLOPs per token against recurrence, linear between the grid's points."""
    by_rec = sorted({r["recurrence"]: r["flops_per_token"] for r in rows}.items())
    xs, ys = np.array([r for r, _ in by_rec], float), np.array([f for _, f in by_rec], float)
    return lambda mu: float(np.interp(mu, xs, ys))


def analyse(rows: list[dict]) -> dict:
    """The JSON-able analysis of a sweep table (module docstring)."""
    F = _fpt(rows)
    budgets = sorted({r["budget"] for r in rows})
    per_budget, rss_parabolas, k_parabolas = [], 0.0, 0
    for C in budgets:
        pts = sorted((r for r in rows if r["budget"] == C), key=lambda r: r["recurrence"])
        entry = {"budget": C, "points": len(pts)}
        try:
            fit = fits.isoflop_minimum([r["recurrence"] for r in pts], [r["loss"] for r in pts])
            mu = fit.values["opt"]
            entry.update(fit=fit.to_json(), recurrence_opt=mu, recurrence_opt_stderr=fit.stderr["opt"],
                         loss_opt=fit.values["loss_opt"], inside=bool(fit.values["inside"]), tokens_opt=C / F(mu))
            x = np.log([r["recurrence"] for r in pts])
            pred = fit.values["c0"] + fit.values["c1"] * x + fit.values["c2"] * x ** 2
            rss_parabolas += float(np.sum((np.array([r["loss"] for r in pts]) - pred) ** 2))
            k_parabolas += 3
        except fits.FitError as e:
            entry["error"] = str(e)
        per_budget.append(entry)
    found = [b for b in per_budget if "error" not in b]
    inside = [b for b in found if b["inside"]]  # a vertex outside the grid is an extrapolation, not a measurement
    out = {"budgets": per_budget, "paper": PAPER, "laws": {}, "additive": None}
    for what, key in (("recurrence", "recurrence_opt"), ("tokens", "tokens_opt")):
        try:
            out["laws"][what] = fits.power_law([b["budget"] for b in inside], [b[key] for b in inside]).to_json()
        except fits.FitError as e:
            out["laws"][what] = {"error": f"{e} ({len(inside)} of {len(budgets)} budgets have a minimum inside "
                                          "the swept recurrences)"}
    out["additive"] = _additive(rows, budgets, F)
    if "error" not in out["additive"] and len(found) == len(budgets):  # both descriptions of the same rows
        n = sum(b["points"] for b in found)
        out["comparison"] = {"aic_parabolas": _aic(rss_parabolas, n, k_parabolas),
                             "aic_additive": out["additive"]["aic"]}
        better = "parabolas" if out["comparison"]["aic_parabolas"] < out["comparison"]["aic_additive"] else "additive"
        out["comparison"]["better"] = better
    return out


def _additive(rows: list[dict], budgets: list[float], F) -> dict:
    mu, D, L = (np.array([r[k] for r in rows], float) for k in ("recurrence", "tokens", "loss"))
    try:
        law = fits.additive_law(mu, D, L)
    except fits.FitError as e:
        return {"error": str(e)}
    v = law.values
    predict = lambda m, d: v["E"] + v["A"] * m ** -v["alpha"] + v["B"] * (d / v["D0"]) ** -v["beta"]  # noqa: E731
    rss = float(np.sum((L - predict(mu, D)) ** 2))
    grid = np.linspace(mu.min(), mu.max(), 2001)
    optima = []
    for C in budgets:  # the law's own optimum along C = F(mu) * D, within the swept recurrences
        losses = [predict(m, C / F(m)) for m in grid]
        m = float(grid[int(np.argmin(losses))])
        optima.append({"budget": C, "recurrence_opt": m, "tokens_opt": C / F(m),
                       "inside": bool(grid[0] < m < grid[-1])})
    out = {"fit": law.to_json(), "aic": _aic(rss, len(L), 5), "optima": optima}
    inside = [o for o in optima if o["inside"]]  # an optimum at the grid's edge is a bound, not a value
    for what in ("recurrence", "tokens"):
        try:
            out[f"law_{what}"] = fits.power_law([o["budget"] for o in inside],
                                                [o[f"{what}_opt"] for o in inside]).to_json()
        except fits.FitError as e:
            out[f"law_{what}"] = {"error": str(e)}
    return out
