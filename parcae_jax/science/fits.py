"""The laws Parcae's claims are stated in, fitted by least squares with uncertainties.

- `saturating_exponential`: test-time scaling, L(T) = L_inf + A * exp(-kappa * T).
- `power_law`: y = k * C^a, a straight line in log-log (compute-optimal recurrence and tokens
  against the FLOP budget).
- `isoflop_minimum`: at one budget, loss against log recurrence as a parabola; its vertex is
  the compute-optimal recurrence (fitting in log recurrence, as isoFLOP analyses do, because
  the grid is roughly geometric and the curve is near-symmetric there).
- `additive_law`: L(mu, D) = E + A * mu^-alpha + B * D^-beta over a whole sweep (loss in
  mean recurrence and tokens, the Chinchilla shape with recurrence in the place of
  parameters).

Each returns a `Fit` (values, standard errors, R^2, the number of points) or raises
`FitError`, one line saying why the points cannot determine the law (too few, flat, no
minimum, unresolved). A fit never returns NaN: a covariance that is not finite is an error.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import optimize, stats

from parcae_jax.errors import UserError


class FitError(UserError, ValueError):
    """The points cannot determine the law; the message says why and what would."""


@dataclasses.dataclass(frozen=True)
class Fit:
    """A fitted law: its values with standard errors, intervals, R² and the points behind it."""

    law: str  # the formula, for tables and plots
    values: dict[str, float]
    stderr: dict[str, float]  # one standard error per value (from the fit's covariance; delta method)
    r2: float
    n: int  # points fitted
    dof: int  # n minus the fitted parameters
    # A value that is exp of another (e.g. opt = exp(log_opt)): its interval is the exp of that
    # one's, asymmetric and positive, as the fit is symmetric in the log.
    exp_of: dict[str, str] = dataclasses.field(default_factory=dict)

    def interval(self, name: str, level: float = 0.95) -> tuple[float, float]:
        """The two-sided `level` confidence interval of a value (Student t with dof degrees)."""
        if name in self.exp_of:
            low, high = self.interval(self.exp_of[name], level)
            return math.exp(low), math.exp(high)
        half = stats.t.ppf(0.5 + level / 2, max(self.dof, 1)) * self.stderr[name]
        return self.values[name] - half, self.values[name] + half

    def to_json(self) -> dict:
        return {"law": self.law, "values": self.values, "stderr": self.stderr,
                "ci95": {k: list(self.interval(k)) for k in self.stderr}, "r2": self.r2, "n": self.n, "dof": self.dof}


def _points(name: str, *arrays, need: int, positive: bool = False) -> list[np.ndarray]:
    out = [np.asarray(a, np.float64).ravel() for a in arrays]
    if len({len(a) for a in out}) != 1:
        raise FitError(f"{name}: the inputs have different lengths {[len(a) for a in out]}")
    if not all(np.isfinite(a).all() for a in out):
        raise FitError(f"{name}: a point is not finite (NaN or inf); drop diverged runs before fitting")
    if positive and not all((a > 0).all() for a in out):
        raise FitError(f"{name}: a value is <= 0; a power law needs positive values")
    distinct = len(np.unique(out[0]))
    if distinct < need:
        plural = "s" if distinct != 1 else ""
        raise FitError(f"{name}: {distinct} distinct point{plural} cannot determine it; it needs at least {need}")
    return out


def _r2(y: np.ndarray, predicted: np.ndarray) -> float:
    total = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - predicted) ** 2)) / total if total > 0 else 1.0


def _flat(name: str, y: np.ndarray) -> None:
    if np.ptp(y) <= 1e-9 + 1e-7 * np.abs(y).mean():
        raise FitError(f"{name}: the loss does not change across the points (range {np.ptp(y):.3g}); "
                       "there is no curve to fit")


def _checked(name: str, values: dict[str, float], cov: np.ndarray, hint: str) -> dict[str, float]:
    err = np.sqrt(np.diag(cov)) if np.all(np.isfinite(cov)) else np.full(len(values), np.inf)
    if not np.all(np.isfinite(err)) or not all(math.isfinite(v) for v in values.values()):
        raise FitError(f"{name}: the points do not pin the parameters down (infinite uncertainty); {hint}")
    return dict(zip(values, map(float, err)))


def saturating_exponential(T, loss) -> Fit:
    """L(T) = L_inf + A * exp(-kappa * T), with A >= 0 and kappa > 0, from >= 4 recurrences."""
    name = "test-time fit L_inf + A*exp(-kappa*T)"
    T, L = _points(name, T, loss, need=4)
    _flat(name, L)
    order = np.argsort(T)
    T, L = T[order], L[order]
    # Start from the line through log(L - floor): the floor a little under the last point.
    floor = L.min() - 0.1 * np.ptp(L)
    slope, icpt = np.polyfit(T, np.log(np.maximum(L - floor, 1e-12)), 1)
    p0 = [floor, math.exp(min(icpt, 50.0)), max(-slope, 1e-3)]  # capped: a steep start must not overflow
    f = lambda t, l_inf, a, kappa: l_inf + a * np.exp(-kappa * t)  # noqa: E731
    try:
        p, cov = optimize.curve_fit(f, T, L, p0=p0, bounds=([-np.inf, 0, 0], [np.inf, np.inf, np.inf]),
                                    maxfev=20000)
    except (RuntimeError, ValueError) as e:
        raise FitError(f"{name}: least squares did not converge ({e})") from None
    values = {"L_inf": float(p[0]), "A": float(p[1]), "kappa": float(p[2])}
    span = values["A"] * (math.exp(-values["kappa"] * T[0]) - math.exp(-values["kappa"] * T[-1]))
    if span < 0.1 * np.ptp(L):  # the best decaying curve explains little of the spread: no decay
        raise FitError(f"{name}: the loss does not fall with T over these points (A={values['A']:.3g}, "
                       f"kappa={values['kappa']:.3g}); there is no decay to fit")
    err = _checked(name, values, cov, "the decay is over before the first point or after the last: "
                   "add smaller or larger T")
    return Fit("L_inf + A*exp(-kappa*T)", values, err, _r2(L, f(T, *p)), len(T), len(T) - 3)


def power_law(C, y) -> Fit:
    """y = k * C^a by least squares on log y = log k + a log C, from >= 3 budgets."""
    name = "power law y = k*C^a"
    C, y = _points(name, C, y, need=3, positive=True)
    x, ly = np.log(C), np.log(y)
    X = np.stack([x, np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(X, ly, rcond=None)
    residual = ly - X @ coef
    cov = np.linalg.inv(X.T @ X) * float(residual @ residual) / (len(x) - 2)  # exact data: zero, not NaN
    values = {"a": float(coef[0]), "log_k": float(coef[1])}
    err = _checked(name, values, cov, "add budgets spread over a wider range")
    return Fit("y = exp(log_k) * C^a", values, err, _r2(ly, X @ coef), len(C), len(C) - 2)


def isoflop_minimum(recurrence, loss) -> Fit:
    """loss = c0 + c1*x + c2*x^2 with x = ln(recurrence), from >= 4 recurrences at one budget.

    Values: c0, c1, c2 and the vertex: log_opt (ln of the optimal recurrence), opt (its
    exponential) and loss_opt; standard errors of the vertex by the delta method. The
    vertex may lie outside the grid (`inside` = 0): the minimum is then an extrapolation.
    """
    name = "isoFLOP parabola in ln(recurrence)"
    r, L = _points(name, recurrence, loss, need=4, positive=True)
    _flat(name, L)
    x = np.log(r)
    coef, cov = np.polyfit(x, L, 2, cov=True)  # highest power first
    c2, c1, c0 = coef
    if not c2 > 0:
        raise FitError(f"{name}: loss against recurrence curves downward or not at all (c2={c2:.3g}); "
                       "there is no minimum: widen the recurrence grid around the best point")
    x_opt = -c1 / (2 * c2)
    if abs(x_opt - x.mean()) > 10 * max(np.ptp(x), 1e-12):  # a near-straight curve: its vertex is nowhere near
        raise FitError(f"{name}: the curve is nearly straight (c2={c2:.3g}); its minimum lies far outside the "
                       "grid: widen the recurrence grid toward the lower losses")
    grad = np.array([c1 / (2 * c2 ** 2), -1 / (2 * c2), 0.0])  # d x_opt / d (c2, c1, c0)
    var_x = float(grad @ cov @ grad)
    values = {"c0": float(c0), "c1": float(c1), "c2": float(c2), "log_opt": float(x_opt),
              "opt": float(math.exp(x_opt)), "loss_opt": float(c0 - c1 ** 2 / (4 * c2)),
              "inside": float(x.min() <= x_opt <= x.max())}
    err = _checked(name, {"c2": c2, "c1": c1, "c0": c0}, cov, "add recurrences")
    err["log_opt"] = math.sqrt(max(var_x, 0.0))
    err["opt"] = values["opt"] * err["log_opt"]
    g = np.array([c1 ** 2 / (4 * c2 ** 2), -c1 / (2 * c2), 1.0])
    err["loss_opt"] = math.sqrt(max(float(g @ cov @ g), 0.0))
    return Fit("c0 + c1*ln(mu) + c2*ln(mu)^2", values, err, _r2(L, np.polyval(coef, x)), len(r), len(r) - 3,
               exp_of={"opt": "log_opt"})


def additive_law(recurrence, tokens, loss) -> Fit:
    """L = E + A * mu^-alpha + B * D^-beta (mu the mean recurrence, D tokens), from >= 6 runs."""
    name = "additive law E + A*mu^-alpha + B*D^-beta"
    mu, D, L = _points(name, recurrence, tokens, loss, need=2, positive=True)
    if len(L) < 6 or len(np.unique(D)) < 2:
        raise FitError(f"{name}: {len(L)} runs over {len(np.unique(mu))} recurrences and {len(np.unique(D))} "
                       "token counts cannot determine 5 parameters; it needs at least 6 runs over 2+ of each")
    if not any(len(np.unique(D[mu == m])) > 1 for m in np.unique(mu)):
        raise FitError(f"{name}: every recurrence was trained on one token count, so tokens are a function of "
                       "recurrence (one FLOP budget?) and their effects cannot be told apart; add budgets")
    _flat(name, L)
    d0 = float(np.exp(np.log(D).mean()))  # tokens in units of their geometric mean: B stays O(1)

    def f(X, e, a, alpha, b, beta):
        m, d = X
        return e + a * m ** -alpha + b * (d / d0) ** -beta

    p0 = [L.min() * 0.9, 0.5 * np.ptp(L) + 1e-3, 0.5, 0.5 * np.ptp(L) + 1e-3, 0.5]
    try:
        p, cov = optimize.curve_fit(f, (mu, D), L, p0=p0, bounds=([-np.inf, 0, 0, 0, 0], [np.inf] * 5), maxfev=50000)
    except (RuntimeError, ValueError) as e:
        raise FitError(f"{name}: least squares did not converge ({e})") from None
    values = dict(zip(["E", "A", "alpha", "B", "beta"], map(float, p)))
    err = _checked(name, values, cov, "the sweep does not vary recurrence and tokens enough")
    values["D0"], err["D0"] = d0, 0.0
    return Fit("E + A*mu^-alpha + B*(D/D0)^-beta", values, err, _r2(L, f((mu, D), *p)), len(L), len(L) - 5)

