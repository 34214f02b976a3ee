"""S(B) fits, the critical batch size with bootstrap intervals, and scaling laws CBS = c X^alpha.

Steps-vs-batch model (McCandlish et al. 2018, arXiv 1812.06162, eq. 2.11; Zhang et al. 2025, arXiv 2410.21676,
sec. 3.1):

    S(B) = a + b/B = S_min (1 + B_noise/B),   a = S_min > 0,  B_noise = b/a > 0,

fitted by least squares on log S (multiplicative noise: a run-to-run spread of a few percent at every B).

Critical batch size (Zhang et al. 2025, sec. 3.1): the batch B* whose steps are (1 + o) times the linear-scaling
prediction from a reference batch B0, S(B*) = (1 + o) S(B0) B0/B*. With the hyperbola,
a B* + b = (1 + o)(a B0 + b), so

    B* = (1 + o) B0 + o b/a = (1 + o) B0 + o B_noise            (o = 0.2, B0 = 256 in the paper).

Scaling laws (Zhang et al. 2025, sec. 4): log B* = log c + alpha log X by OLS (statsmodels) over settings, for
X = data tokens D and X = non-embedding parameters N.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from scipy import stats

from analysis.steps import Setting, StepsPoint, StepsTable

LEVEL = 0.95
MIN_BATCHES = 3
"""Fewer usable batch sizes than this and a setting is reported as insufficient (2 parameters + 1 dof)."""
_GOLDEN = (math.sqrt(5) - 1) / 2
_GRID = 64  # coarse grid on log B_noise; 64 x n x resamples floats is cheap and finds the global basin
_GOLDEN_ITERS = 40  # shrinks the 2-cell bracket by 0.618^40 ~ 4e-9
_SPAN = math.log(1e4)  # B_noise searched in [B_min/1e4, B_max*1e4]; beyond, S(B) is flat or exactly 1/B


# ----------------------------------------------------------------------------------------------------------------
# the hyperbola


def critical_batch_size(b_noise, reference_batch, overhead):
    """B* = (1 + o) B0 + o B_noise (Zhang et al. 2025, sec. 3.1, with S = S_min (1 + B_noise/B)); vectorised."""
    return (1.0 + overhead) * np.asarray(reference_batch, float) + overhead * np.asarray(b_noise, float)


def steps_model(batch, s_min, b_noise):
    """S(B) = S_min (1 + B_noise/B) (McCandlish et al. 2018, eq. 2.11); vectorised."""
    return s_min * (1.0 + b_noise / np.asarray(batch, float))


@dataclass(frozen=True)
class LogHyperbolaFits:
    """Least-squares fits of log S = log(a + b/B) for m data sets on the same batch sizes (arrays of length m)."""

    log_s_min: np.ndarray
    log_b_noise: np.ndarray
    bound: np.ndarray
    """-1: B_noise at the lower search bound (S flat in B); +1: at the upper bound (S ~ 1/B throughout); 0: inside."""
    fitted: np.ndarray
    """(m, n) fitted log S."""


def _profile_rss(log_steps: np.ndarray, inv_batch: np.ndarray, u: np.ndarray) -> np.ndarray:
    """RSS of log S at log B_noise = u with log S_min profiled out.

    log S_i = log S_min + log(1 + e^u / B_i): for fixed u the model is linear in log S_min, whose least-squares
    value is the mean of log S_i - log(1 + e^u/B_i); the RSS is then the centred sum of squares.
    Shapes: log_steps (m, n), u (m,) or (m, k) -> (m,) or (m, k).
    """
    g = np.log1p(np.exp(u)[..., None] * inv_batch)
    r = (log_steps[:, None, :] if u.ndim == 2 else log_steps) - g
    r = r - r.mean(axis=-1, keepdims=True)
    return np.einsum("...i,...i->...", r, r)


def fit_log_hyperbola(batch, log_steps) -> LogHyperbolaFits:
    """Global least squares of log S = log(a + b/B), a, b > 0, for each row of `log_steps` (m, n) at once.

    Profile likelihood in u = log(b/a) (see `_profile_rss`): a 64-point grid over [log B_min - log 1e4,
    log B_max + log 1e4] picks the basin, golden-section search refines it to ~1e-8 in u. One pass costs
    O(m n (64 + 40)) flops, so 10^5 bootstrap refits take well under a second; `scipy.optimize.least_squares`
    in (log a, log b) reaches the same minimum one data set at a time (tests/test_fit.py checks).
    """
    batch = np.asarray(batch, float)
    y = np.atleast_2d(np.asarray(log_steps, float))
    x = 1.0 / batch
    lo, hi = math.log(batch.min()) - _SPAN, math.log(batch.max()) + _SPAN
    grid = np.linspace(lo, hi, _GRID)
    k = _profile_rss(y, x, np.broadcast_to(grid, (len(y), _GRID))).argmin(axis=1)
    left, right = grid[np.maximum(k - 1, 0)], grid[np.minimum(k + 1, _GRID - 1)]
    u = _golden_section(lambda v: _profile_rss(y, x, v), left, right)
    g = np.log1p(np.exp(u)[:, None] * x)
    log_a = (y - g).mean(axis=1)
    tol = 1e-6 * (hi - lo)
    bound = np.where(u <= lo + tol, -1, np.where(u >= hi - tol, 1, 0))
    return LogHyperbolaFits(log_s_min=log_a, log_b_noise=u, bound=bound, fitted=g + log_a[:, None])


def _golden_section(f, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Vectorised golden-section minimisation of f on [left, right] (elementwise brackets)."""
    c, d = right - _GOLDEN * (right - left), left + _GOLDEN * (right - left)
    fc, fd = f(c), f(d)
    for _ in range(_GOLDEN_ITERS):
        keep_left = fc < fd  # minimum in [left, d]: d <- c, new c; else in [c, right]: c <- d, new d
        right, left = np.where(keep_left, d, right), np.where(keep_left, left, c)
        new = np.where(keep_left, right - _GOLDEN * (right - left), left + _GOLDEN * (right - left))
        f_new = f(new)
        c, d = np.where(keep_left, new, d), np.where(keep_left, c, new)
        fc, fd = np.where(keep_left, f_new, fd), np.where(keep_left, fc, f_new)
    return (left + right) / 2


@dataclass(frozen=True)
class HyperbolaFit:
    """One least-squares fit of S(B) = S_min (1 + B_noise/B) on log S."""

    s_min: float
    b_noise: float
    rss: float
    """Residual sum of squares of log S."""
    n_points: int
    bound: int
    """See LogHyperbolaFits.bound."""

    @property
    def a(self) -> float:
        return self.s_min

    @property
    def b(self) -> float:
        return self.s_min * self.b_noise

    def steps(self, batch):
        return steps_model(batch, self.s_min, self.b_noise)


def fit_hyperbola(batch, steps) -> HyperbolaFit:
    """Least-squares fit of log S = log(a + b/B) with a, b > 0 (McCandlish et al. 2018, eq. 2.11)."""
    batch, steps = np.asarray(batch, float), np.asarray(steps, float)
    f = fit_log_hyperbola(batch, np.log(steps)[None, :])
    rss = float(((np.log(steps) - f.fitted[0]) ** 2).sum())
    return HyperbolaFit(s_min=float(np.exp(f.log_s_min[0])), b_noise=float(np.exp(f.log_b_noise[0])), rss=rss,
                        n_points=len(batch), bound=int(f.bound[0]))


# ----------------------------------------------------------------------------------------------------------------
# bootstrap intervals


@dataclass(frozen=True)
class BootstrapIntervals:
    s_min: tuple[float, float]
    b_noise: tuple[float, float]
    n_resamples: int
    level: float


def bootstrap_hyperbola(batch, steps, fit: HyperbolaFit, n_resamples: int, rng: np.random.Generator,
                        level: float = LEVEL) -> BootstrapIntervals:
    """Intervals for S_min and B_noise: residual bootstrap over the batch points, t-expanded percentile.

    The n residuals of log S at the batch points, rescaled by sqrt(n/(n-2)) (2 fitted parameters) and centred,
    are resampled with replacement onto the fitted curve, and every resample is refitted (Davison & Hinkley
    1997, alg. 6.1). With 3-9 batch points the plain percentile interval of (log S_min, log B_noise) under-covers
    (~80% for a nominal 95% at n = 4-6, in our simulations; resampling the (B, S) pairs was worse, ~65-85%),
    because the bootstrap distribution knows neither the t-tails of an estimated scale nor the lost degrees of
    freedom. So each percentile interval is expanded about the estimate by t_{n-2, q}/z_q, q = (1 + level)/2
    (the small-sample correction of Hesterberg's "expanded percentile" interval, Hesterberg 2015, Am. Stat. 69,
    sec. 5): simulated coverage 92-97% for n = 3..9 and noise 3-20% (tests/test_fit.py checks >= 90%).
    Resamples at the upper search bound of B_noise (S ~ 1/B, no saturation) make the upper limit +inf.
    """
    batch, y = np.asarray(batch, float), np.log(np.asarray(steps, float))
    n = len(batch)
    if n < MIN_BATCHES:
        raise ValueError(f"a bootstrap of a 2-parameter fit needs >= {MIN_BATCHES} batch sizes: got {n}")
    fitted = np.log(fit.steps(batch))
    e = (y - fitted) * math.sqrt(n / (n - 2))
    e -= e.mean()
    star = fit_log_hyperbola(batch, fitted + e[rng.integers(0, n, size=(n_resamples, n))])
    widen = stats.t.ppf((1 + level) / 2, n - 2) / NormalDist().inv_cdf((1 + level) / 2)
    lo_s, hi_s = _expanded_percentile(math.log(fit.s_min), star.log_s_min, level, widen)
    lo_b, hi_b = _expanded_percentile(math.log(fit.b_noise), star.log_b_noise, level, widen)
    tail = (1 - level) / 2
    if np.mean(star.bound == 1) > tail:  # the upper tail of B_noise is unbounded, that of S_min reaches 0
        hi_b, lo_s = math.inf, 0.0
    if np.mean(star.bound == -1) > tail:
        lo_b = 0.0
    return BootstrapIntervals(s_min=(lo_s, hi_s), b_noise=(lo_b, hi_b), n_resamples=n_resamples, level=level)


def _expanded_percentile(estimate: float, replicates: np.ndarray, level: float, widen: float):
    """exp of [est + w (q_lo - est), est + w (q_hi - est)] on the log scale (see bootstrap_hyperbola)."""
    q = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return tuple(float(np.exp(estimate + widen * (v - estimate))) for v in q)


# ----------------------------------------------------------------------------------------------------------------
# per setting


NAN2 = (math.nan, math.nan)


@dataclass(frozen=True)
class CbsEstimate:
    """The fit of one setting; estimates are NaN (and `note` says why) when it could not be fitted."""

    setting: Setting
    n_batches: int
    """Usable (uncensored) batch sizes."""
    reference_batch: float
    s_min: float = math.nan
    b_noise: float = math.nan
    cbs: float = math.nan
    s_min_ci: tuple[float, float] = NAN2
    b_noise_ci: tuple[float, float] = NAN2
    cbs_ci: tuple[float, float] = NAN2
    fit: HyperbolaFit | None = None
    note: str = ""

    @property
    def fitted(self) -> bool:
        return math.isfinite(self.cbs)


def setting_rng(seed: int, name: str) -> np.random.Generator:
    """A generator per (seed, setting name): a setting's interval does not depend on which others exist."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def estimate_setting(setting: Setting, points: list[StepsPoint], overhead: float,
                     reference_batch: float | None = None, n_resamples: int = 1000, seed: int = 0,
                     level: float = LEVEL) -> CbsEstimate:
    """Fit S(B), then B* = (1 + o) B0 + o B_noise with intervals.

    B0 defaults to the smallest batch of the setting, censored or not: B0 only anchors the linear-scaling line
    S(B0) B0/B on the fitted curve, and a study's settings then share the B0 of their common batch grid, so that
    their CBS are comparable (a censored smallest batch would otherwise shift one setting's B0).
    """
    usable = [p for p in points if not p.censored]
    batch = np.array([p.batch_size for p in usable], float)
    b0 = float(reference_batch) if reference_batch else float(min((p.batch_size for p in points), default=math.nan))
    base = dict(setting=setting, n_batches=len(usable), reference_batch=b0)
    if len(usable) < MIN_BATCHES:
        return CbsEstimate(**base, note=f"insufficient: {len(usable)} batch size(s) reached the target, "
                                         f"need >= {MIN_BATCHES}")
    steps = np.array([p.steps for p in usable], float)
    fit = fit_hyperbola(batch, steps)
    if fit.bound == 1:
        return CbsEstimate(**base, fit=fit, note=f"no saturation: S ~ 1/B up to B={batch.max():g}; "
                                                 "CBS is beyond the measured batch sizes")
    cbs = float(critical_batch_size(fit.b_noise, b0, overhead))
    note = _fit_note(fit, cbs, float(batch.max()))
    if n_resamples <= 0:
        return CbsEstimate(**base, s_min=fit.s_min, b_noise=fit.b_noise, cbs=cbs, fit=fit, note=note)
    ci = bootstrap_hyperbola(batch, steps, fit, n_resamples, setting_rng(seed, setting.name), level)
    cbs_ci = tuple(float(critical_batch_size(v, b0, overhead)) for v in ci.b_noise)  # B* is affine in B_noise
    return CbsEstimate(**base, s_min=fit.s_min, b_noise=fit.b_noise, cbs=cbs, s_min_ci=ci.s_min,
                       b_noise_ci=ci.b_noise, cbs_ci=cbs_ci, fit=fit, note=note)


def _fit_note(fit: HyperbolaFit, cbs: float, max_batch: float) -> str:
    notes = ["B_noise below the measured batch sizes (S nearly flat in B)"] if fit.bound == -1 else []
    if cbs > max_batch:
        notes.append(f"CBS above the largest usable batch ({max_batch:g}): extrapolated")
    return "; ".join(notes)


# ----------------------------------------------------------------------------------------------------------------
# scaling laws


LAW_SYMBOLS = {"tokens": "D", "model_params": "N"}


@dataclass(frozen=True)
class ScalingLaw:
    """log B* = log c + alpha log X by OLS (natural logs); enough to forecast with a prediction interval.

    Prediction at x (a new setting, not the mean line): log B*(x) ~ xi' beta +- t_{df, q} sqrt(xi' V xi + s^2),
    xi = (1, log x), V = cov(beta), s^2 = residual variance (standard OLS prediction interval).
    With 2 points (df = 0) the line is exact and every interval is NaN.
    """

    variable: str
    log_coefficient: float
    exponent: float
    cov: tuple[tuple[float, float], tuple[float, float]]
    residual_variance: float
    df_resid: int
    r2: float
    n_points: int
    x_range: tuple[float, float]
    settings: tuple[str, ...] = ()
    pooled: bool = False
    """True when the other variable (N for the D law, D for the N law) also varies across the points."""
    level: float = LEVEL

    @property
    def symbol(self) -> str:
        return LAW_SYMBOLS.get(self.variable, self.variable)

    @property
    def coefficient(self) -> float:
        return math.exp(self.log_coefficient)

    def _t(self, level: float) -> float:
        return float(stats.t.ppf((1 + level) / 2, self.df_resid)) if self.df_resid > 0 else math.nan

    @property
    def exponent_ci(self) -> tuple[float, float]:
        half = self._t(self.level) * math.sqrt(self.cov[1][1])
        return (self.exponent - half, self.exponent + half)

    @property
    def coefficient_ci(self) -> tuple[float, float]:
        half = self._t(self.level) * math.sqrt(self.cov[0][0])
        return (math.exp(self.log_coefficient - half), math.exp(self.log_coefficient + half))

    def predict(self, x, prediction: bool = True, level: float | None = None):
        """(point, low, high) of B* at x; `prediction=False` gives the confidence band of the mean line."""
        lx = np.log(np.asarray(x, float))
        mean = self.log_coefficient + self.exponent * lx
        v = np.array(self.cov)
        var = v[0, 0] + 2 * v[0, 1] * lx + v[1, 1] * lx**2 + (self.residual_variance if prediction else 0.0)
        half = self._t(level or self.level) * np.sqrt(var)
        return np.exp(mean), np.exp(mean - half), np.exp(mean + half)


def _num(v) -> float | None:
    """JSON has no NaN/inf: write null."""
    return float(v) if v is not None and math.isfinite(v) else None


def law_to_json(law: ScalingLaw) -> dict:
    """The scaling.json entry of one law (natural logs; NaN -> null)."""
    return {
        "variable": law.variable, "symbol": law.symbol, "formula": f"CBS = c * {law.symbol}^alpha",
        "coefficient": _num(law.coefficient), "coefficient_ci": [_num(v) for v in law.coefficient_ci],
        "exponent": _num(law.exponent), "exponent_ci": [_num(v) for v in law.exponent_ci], "level": law.level,
        "r2": _num(law.r2), "n_points": law.n_points, "df_resid": law.df_resid,
        "log_coefficient": _num(law.log_coefficient),
        "cov_log_coefficient_exponent": [[_num(v) for v in row] for row in law.cov],
        "residual_variance": _num(law.residual_variance), "x_range": list(law.x_range),
        "settings": list(law.settings), "pooled_over_other_variable": law.pooled,
    }


def law_from_json(d: dict) -> ScalingLaw:
    """Inverse of law_to_json; KeyError/TypeError/ValueError on a malformed entry."""
    def f(v):
        return math.nan if v is None else float(v)

    cov = d["cov_log_coefficient_exponent"]
    law = ScalingLaw(variable=str(d["variable"]), log_coefficient=float(d["log_coefficient"]),
                     exponent=float(d["exponent"]), cov=((f(cov[0][0]), f(cov[0][1])), (f(cov[1][0]), f(cov[1][1]))),
                     residual_variance=f(d["residual_variance"]), df_resid=int(d["df_resid"]), r2=f(d["r2"]),
                     n_points=int(d["n_points"]), x_range=(float(d["x_range"][0]), float(d["x_range"][1])),
                     settings=tuple(d.get("settings", ())), pooled=bool(d.get("pooled_over_other_variable")),
                     level=float(d.get("level", LEVEL)))
    if not (math.isfinite(law.log_coefficient) and math.isfinite(law.exponent)) or law.df_resid < 0:
        raise ValueError("log_coefficient and exponent must be finite numbers")
    return law


def fit_scaling_law(x, cbs, variable: str, settings=(), pooled: bool = False,
                    level: float = LEVEL) -> ScalingLaw | None:
    """OLS of log B* on log X (statsmodels); None with fewer than 2 distinct X."""
    import statsmodels.api as sm  # ~0.5 s to import; only needed here

    x, cbs = np.asarray(x, float), np.asarray(cbs, float)
    if len(np.unique(x)) < 2:
        return None
    res = sm.OLS(np.log(cbs), sm.add_constant(np.log(x))).fit()
    df = int(round(res.df_resid))
    cov = np.asarray(res.cov_params()) if df > 0 else np.full((2, 2), math.nan)
    return ScalingLaw(variable=variable, log_coefficient=float(res.params[0]), exponent=float(res.params[1]),
                      cov=tuple(tuple(float(v) for v in row) for row in cov),
                      residual_variance=float(res.scale) if df > 0 else math.nan, df_resid=df,
                      r2=float(res.rsquared) if df > 0 else 1.0, n_points=len(x),
                      x_range=(float(x.min()), float(x.max())), settings=tuple(settings), pooled=pooled,
                      level=level)


def fit_scaling_laws(estimates: list[CbsEstimate], level: float = LEVEL) -> dict[str, ScalingLaw]:
    """The D law and the N law over the fitted settings (each only when its variable takes >= 2 values)."""
    ok = [e for e in estimates if e.fitted]
    cbs = [e.cbs for e in ok]
    laws = {}
    for variable, other in (("tokens", "model_params"), ("model_params", "tokens")):
        x = [getattr(e.setting, variable) for e in ok]
        pooled = len({getattr(e.setting, other) for e in ok}) > 1
        law = fit_scaling_law(x, cbs, variable, [e.setting.name for e in ok], pooled, level)
        if law is not None:
            laws[variable] = law
    return laws


# ----------------------------------------------------------------------------------------------------------------
# a whole study


@dataclass
class StudyFit:
    table: StepsTable
    estimates: list[CbsEstimate]
    laws: dict[str, ScalingLaw]
    overhead: float
    reference_batch: float | None
    """As given on the command line; None = each setting's smallest batch."""
    n_resamples: int
    seed: int
    level: float = LEVEL


def fit_study(table: StepsTable, overhead: float = 0.2, reference_batch: float | None = None,
              n_resamples: int = 1000, seed: int = 0, level: float = LEVEL) -> StudyFit:
    """Every setting's S(B) fit and CBS, then the scaling laws over the settings that could be fitted."""
    estimates = [estimate_setting(s, table.points_of(s.name), overhead, reference_batch, n_resamples, seed, level)
                 for s in table.settings()]
    return StudyFit(table=table, estimates=estimates, laws=fit_scaling_laws(estimates, level), overhead=overhead,
                    reference_batch=reference_batch, n_resamples=n_resamples, seed=seed, level=level)
