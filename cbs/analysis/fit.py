"""S(B) fits (plain and censored), the critical batch size with bootstrap intervals, its degradation range and
per-setting diagnostics. Laws over settings are in cbs/analysis/laws.py; docs/method.md gives every formula.

Steps-vs-batch model (McCandlish et al. 2018, arXiv 1812.06162, eq. 2.11; Zhang et al. 2025, arXiv 2410.21676,
sec. 3.1):

    S(B) = a + b/B = S_min (1 + B_noise/B),   a = S_min > 0,  B_noise = b/a > 0,

fitted by least squares on log S (multiplicative noise: a run-to-run spread of a few percent at every B). A batch
where no run reached the target within its cap (S > cap) enters as a lower bound (censored likelihood, below).

Critical batch size (Zhang et al. 2025, sec. 3.1): the batch B* whose steps are (1 + o) times the linear-scaling
prediction from a reference batch B0, S(B*) = (1 + o) S(B0) B0/B*. With the hyperbola,
a B* + b = (1 + o)(a B0 + b), so

    B* = (1 + o) B0 + o b/a = (1 + o) B0 + o B_noise            (o = 0.2, B0 = 256 in the paper).

The same formula at several o (0.1, 0.2, 0.5, 1.0) is the degradation range: how fast a larger batch stops paying.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
from scipy import special, stats

from cbs.analysis.fit_checks import (
    SIGMA_FLOOR, NoiseLevel, b_noise_bound, cbs_bound, lack_of_fit, pooled_noise, reference_batch_warning,
)
from cbs.analysis.steps import Setting, StepsPoint

LEVEL = 0.95
MIN_BATCHES = 3
"""Fewer usable batch sizes than this and a setting is reported as insufficient (2 parameters + 1 dof)."""
DEGRADATION_OVERHEADS = (0.1, 0.2, 0.5, 1.0)
BOUND_CONFLICT_Z = 2.0
"""Warn when a censored batch's bound stays this many residual s.d. (of log S) above the fitted curve."""
B0_SHARE_WARNING = 0.5
"""Warn when (1 + o) B0 is at least this share of the CBS: the CBS then says more about B0 than about B_noise."""
_GOLDEN = (math.sqrt(5) - 1) / 2
_GRID = 64  # coarse grid on log B_noise; 64 x n x resamples floats is cheap and finds the global basin
_GOLDEN_ITERS = 40  # shrinks the 2-cell bracket by 0.618^40 ~ 4e-9
_NEWTON_ITERS = 8  # log S_min of the censored profile: convex in one variable; 6 already agree with 30 to 4e-7
# in B_noise for bounds up to 20x above the curve
_SPAN = math.log(1e4)  # B_noise searched in [B_min/1e4, B_max*1e4]; beyond, S(B) is flat or exactly 1/B
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------------------------
# the hyperbola


def critical_batch_size(b_noise, reference_batch, overhead):
    """B* = (1 + o) B0 + o B_noise (Zhang et al. 2025, sec. 3.1, with S = S_min (1 + B_noise/B)); vectorised."""
    return (1.0 + overhead) * np.asarray(reference_batch, float) + overhead * np.asarray(b_noise, float)


def steps_model(batch, s_min, b_noise):
    """S(B) = S_min (1 + B_noise/B) (McCandlish et al. 2018, eq. 2.11); vectorised."""
    return s_min * (1.0 + b_noise / np.asarray(batch, float))


@dataclass(frozen=True)
class Censoring:
    """Lower bounds S(B_j) > cap_j that enter the likelihood, with the residual scale sigma of log S."""

    batch: np.ndarray
    log_caps: np.ndarray
    sigma: float

    @property
    def inv_batch(self) -> np.ndarray:
        return 1.0 / self.batch


@dataclass(frozen=True)
class LogHyperbolaFits:
    """Fits of log S = log(a + b/B) for m data sets on the same batch sizes (arrays of length m)."""

    log_s_min: np.ndarray
    log_b_noise: np.ndarray
    bound: np.ndarray
    """-1: B_noise at the lower search bound (S flat in B); +1: at the upper bound (S ~ 1/B throughout); 0: inside."""
    fitted: np.ndarray
    """(m, n) fitted log S at the uncensored points."""


def _log_survival(z: np.ndarray) -> np.ndarray:
    """log(1 - Phi(z)), accurate in both tails."""
    return special.log_ndtr(-z)


def _hazard(z: np.ndarray) -> np.ndarray:
    """phi(z) / (1 - Phi(z)), the inverse Mills ratio of the upper tail; z (1 - ...) stays finite for large z."""
    return np.exp(-0.5 * z * z - _LOG_SQRT_2PI - special.log_ndtr(-z))


def _censored_log_a(y, g, gc, cens: Censoring):
    """argmin over m = log a of  sum_i (y_i - m - g_i)^2 / (2 s^2) - sum_j log(1 - Phi((l_j - m - g_j) / s)).

    Convex in m (the Gaussian log-survival is concave), so Newton from the least-squares value converges; the
    curvature is at least n / s^2. Shapes: y, g (..., n); gc (..., k) -> (...).
    """
    s2, n = cens.sigma ** 2, y.shape[-1]
    m = (y - g).mean(axis=-1)
    for _ in range(_NEWTON_ITERS):
        z = (cens.log_caps - m[..., None] - gc) / cens.sigma
        lam = _hazard(z)
        grad = -(y - m[..., None] - g).sum(axis=-1) / s2 - lam.sum(axis=-1) / cens.sigma
        hess = (n + (lam * (lam - z)).sum(axis=-1)) / s2
        m = m - grad / hess
    return m


def _profile(log_steps: np.ndarray, inv_batch: np.ndarray, u: np.ndarray, cens: Censoring | None):
    """Objective at log B_noise = u with log S_min profiled out; returns (objective, log S_min).

    Plain: log S_i = log S_min + log(1 + e^u / B_i) is linear in log S_min, whose least-squares value is the mean
    of log S_i - log(1 + e^u/B_i); the objective is the RSS. Censored: minus the log-likelihood (up to constants)
    of the Tobit model below, log S_min by Newton. Shapes: log_steps (m, n), u (m,) or (m, K) -> u's shape.
    """
    g = np.log1p(np.exp(u)[..., None] * inv_batch)
    y = log_steps[:, None, :] if u.ndim == 2 else log_steps
    if cens is None:
        log_a = (y - g).mean(axis=-1)
        r = y - g - log_a[..., None]
        return np.einsum("...i,...i->...", r, r), log_a
    gc = np.log1p(np.exp(u)[..., None] * cens.inv_batch)
    log_a = _censored_log_a(y, g, gc, cens)
    r = y - g - log_a[..., None]
    z = (cens.log_caps - log_a[..., None] - gc) / cens.sigma
    nll = np.einsum("...i,...i->...", r, r) / (2 * cens.sigma ** 2) - _log_survival(z).sum(axis=-1)
    return nll, log_a


def fit_log_hyperbola(batch, log_steps, censoring: Censoring | None = None) -> LogHyperbolaFits:
    """Global fit of log S = log(a + b/B), a, b > 0, for each row of `log_steps` (m, n) at once.

    Without censoring: least squares. With it (Tobit 1958; Amemiya 1984, J. Econometrics 24, sec. 2): maximum
    likelihood of log S_i ~ N(log S(B_i), s^2) for the reached points and P(log S(B_j) + e > log cap_j) =
    1 - Phi((log cap_j - log S(B_j)) / s) for each censored point, s held at the plain fit's residual scale.
    Both profile out log S_min (`_profile`) and search u = log(b/a): a 64-point grid over
    [log B_min - log 1e4, log B_max + log 1e4] picks the basin, golden-section search refines it to ~1e-8 in u.
    One pass costs O(m n (64 + 40)) flops (x8 Newton steps when censored), so 10^5 bootstrap refits take about
    a second; `scipy.optimize` reaches the same optimum one data set at a time (tests/test_fit.py checks).
    """
    batch = np.asarray(batch, float)
    y = np.atleast_2d(np.asarray(log_steps, float))
    x = 1.0 / batch
    all_batches = batch if censoring is None else np.concatenate([batch, censoring.batch])
    lo, hi = math.log(all_batches.min()) - _SPAN, math.log(all_batches.max()) + _SPAN
    grid = np.linspace(lo, hi, _GRID)
    k = _profile(y, x, np.broadcast_to(grid, (len(y), _GRID)), censoring)[0].argmin(axis=1)
    left, right = grid[np.maximum(k - 1, 0)], grid[np.minimum(k + 1, _GRID - 1)]
    u = _golden_section(lambda v: _profile(y, x, v, censoring)[0], left, right)
    log_a = _profile(y, x, u, censoring)[1]
    g = np.log1p(np.exp(u)[:, None] * x)
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
    """One fit of S(B) = S_min (1 + B_noise/B) on log S (least squares, or Tobit with lower bounds)."""

    s_min: float
    b_noise: float
    rss: float
    """Residual sum of squares of log S at the reached points."""
    n_points: int
    """Reached (uncensored) points."""
    bound: int
    """See LogHyperbolaFits.bound."""
    n_censored: int = 0
    """Lower bounds S(B) > cap in the likelihood."""
    sigma: float = math.nan
    """The residual scale of log S the censored likelihood used (NaN without censored points)."""
    censoring: Censoring | None = field(default=None, compare=False, repr=False)
    """The lower bounds and scale of the censored likelihood (None without censored points); the bootstrap
    refits with the same."""

    @property
    def a(self) -> float:
        return self.s_min

    @property
    def b(self) -> float:
        return self.s_min * self.b_noise

    def steps(self, batch):
        return steps_model(batch, self.s_min, self.b_noise)


def residual_scale(rss: float, n_points: int) -> float:
    """s = sqrt(RSS / (n - 2)) of log S (2 fitted parameters); NaN with 2 points or fewer."""
    return math.sqrt(rss / (n_points - 2)) if n_points > 2 else math.nan


def fit_hyperbola(batch, steps, censored_batch=(), caps=(), noise: NoiseLevel | None = None) -> HyperbolaFit:
    """Fit of log S = log(a + b/B) with a, b > 0 (McCandlish et al. 2018, eq. 2.11).

    With lower bounds S(B_j) > cap_j: the censored (Tobit) likelihood of `fit_log_hyperbola`, its scale s the
    study's pooled noise level when given (`noise`), else the plain fit's residual scale sqrt(RSS / (n - 2));
    floored at SIGMA_FLOOR either way.
    """
    batch, steps = np.asarray(batch, float), np.asarray(steps, float)
    y = np.log(steps)
    plain = fit_log_hyperbola(batch, y[None, :])
    censoring = None
    if len(caps):
        rss0 = float(((y - plain.fitted[0]) ** 2).sum())
        own = residual_scale(rss0, len(batch)) if len(batch) > 2 else SIGMA_FLOOR
        sigma = noise.scale if noise is not None else max(own, SIGMA_FLOOR)
        censoring = Censoring(np.asarray(censored_batch, float), np.log(np.asarray(caps, float)), sigma)
    f = plain if censoring is None else fit_log_hyperbola(batch, y[None, :], censoring)
    return HyperbolaFit(s_min=float(np.exp(f.log_s_min[0])), b_noise=float(np.exp(f.log_b_noise[0])),
                        rss=float(((y - f.fitted[0]) ** 2).sum()), n_points=len(batch), bound=int(f.bound[0]),
                        n_censored=len(caps), sigma=censoring.sigma if censoring else math.nan,
                        censoring=censoring)


# ----------------------------------------------------------------------------------------------------------------
# bootstrap intervals


@dataclass(frozen=True)
class BootstrapIntervals:
    s_min: tuple[float, float]
    b_noise: tuple[float, float]
    n_resamples: int
    level: float


def bootstrap_hyperbola(batch, steps, fit: HyperbolaFit, n_resamples: int, rng: np.random.Generator,
                        level: float = LEVEL, censoring: Censoring | None = None,
                        noise: NoiseLevel | None = None) -> BootstrapIntervals:
    """Intervals for S_min and B_noise: parametric bootstrap at a pooled noise level, t-expanded percentile.

    Every resample puts Gaussian errors of s.d. sigma on the fitted log S at the reached points and is refitted
    (Davison & Hinkley 1997, sec. 2.2); a censored batch is redrawn too and stays a lower bound only above its
    cap (`_censored_resamples`). sigma is the study's pooled residual scale (`noise`, cbs/analysis/fit_checks.py)
    floored at SIGMA_FLOOR, or without one the setting's own sqrt(RSS / (n - 2)). Each percentile interval of (log S_min, log B_noise) is expanded about the
    estimate by t_{dof, q} / z_q, q = (1 + level)/2, dof that of sigma (Hesterberg 2015, Am. Stat. 69, sec. 5,
    "expanded percentile"): the bootstrap knows neither the t-tails of an estimated scale nor the lost dof.
    Why not the setting's own residuals: with 3 batches they have 1 dof, so a lucky draw with small residuals
    gave a collapsed interval (three points on the curve: a zero-width one; at 5% noise 1 in 8 3-batch intervals
    was under 1/5 of the median width and covered 55%), and t_1/z = 6.5 made the others very wide. Pooled over a
    3 x 3 study the scale has 9-36 dof (coverage in bench/fit_coverage.py).
    Resamples at the upper search bound of B_noise (S ~ 1/B, no saturation) make the upper limit +inf.
    """
    batch, y = np.asarray(batch, float), np.log(np.asarray(steps, float))
    n = len(batch)
    if n < MIN_BATCHES:
        raise ValueError(f"a bootstrap of a 2-parameter fit needs >= {MIN_BATCHES} batch sizes: got {n}")
    fitted = np.log(fit.steps(batch))
    if noise is None:
        noise = NoiseLevel(residual_scale(float(((y - fitted) ** 2).sum()), n), n - 2)
    y_star = fitted + noise.scale * rng.standard_normal((n_resamples, n))
    star = (fit_log_hyperbola(batch, y_star, censoring) if censoring is None
            else _censored_resamples(batch, y_star, fit, censoring, noise.scale, rng))
    widen = stats.t.ppf((1 + level) / 2, noise.dof) / NormalDist().inv_cdf((1 + level) / 2)
    lo_s, hi_s = _expanded_percentile(math.log(fit.s_min), star.log_s_min, level, widen)
    lo_b, hi_b = _expanded_percentile(math.log(fit.b_noise), star.log_b_noise, level, widen)
    tail = (1 - level) / 2
    if np.mean(star.bound == 1) > tail:  # the upper tail of B_noise is unbounded, that of S_min reaches 0
        hi_b, lo_s = math.inf, 0.0
    if np.mean(star.bound == -1) > tail:
        lo_b = 0.0
    return BootstrapIntervals(s_min=(lo_s, hi_s), b_noise=(lo_b, hi_b), n_resamples=n_resamples, level=level)


def _censored_resamples(batch, y_star, fit: HyperbolaFit, cens: Censoring, sigma: float,
                        rng: np.random.Generator) -> LogHyperbolaFits:
    """Refits of resamples that redraw the censored batches too: each one's log S is drawn on the fitted curve and
    stays a lower bound only when it lands above its cap, else it is a reached point. Keeping the bounds fixed
    instead ignores that censoring is itself random, and 6-batch settings with a censored largest batch covered
    ~50% (bench/fit_coverage.py). Resamples are refitted in groups of one censoring pattern (2^k for k bounds).
    Returns the fits in resample order (`fitted` is not filled)."""
    y_c = np.log(fit.steps(cens.batch)) + sigma * rng.standard_normal((len(y_star), len(cens.batch)))
    over = y_c > cens.log_caps
    out = {k: np.empty(len(y_star)) for k in ("log_s_min", "log_b_noise", "bound")}
    for pattern in np.unique(over, axis=0):
        rows = (over == pattern).all(axis=1)
        reached = np.concatenate([batch, cens.batch[~pattern]])
        ys = np.concatenate([y_star[rows], y_c[rows][:, ~pattern]], axis=1)
        bounds = Censoring(cens.batch[pattern], cens.log_caps[pattern], sigma) if pattern.any() else None
        f = fit_log_hyperbola(reached, ys, bounds)
        for k in out:
            out[k][rows] = getattr(f, k)
    return LogHyperbolaFits(out["log_s_min"], out["log_b_noise"], out["bound"], np.empty((len(y_star), 0)))


def _expanded_percentile(estimate: float, replicates: np.ndarray, level: float, widen: float):
    """exp of [est + w (q_lo - est), est + w (q_hi - est)] on the log scale (see bootstrap_hyperbola)."""
    q = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return tuple(float(np.exp(estimate + widen * (v - estimate))) for v in q)


# ----------------------------------------------------------------------------------------------------------------
# per setting


NAN2 = (math.nan, math.nan)


@dataclass(frozen=True)
class Degradation:
    """B(o) = (1 + o) B0 + o B_noise at one overhead o, with the interval mapped from B_noise's."""

    overhead: float
    batch: float
    low: float
    high: float


@dataclass(frozen=True)
class Diagnostics:
    """How well S(B) = S_min (1 + B_noise/B) describes one setting's reached points (all on log S)."""

    batches: tuple[int, ...]
    residuals: tuple[float, ...]
    """log S - fitted log S at each reached batch (0.05 = 5% above the curve)."""
    residual_sd: float
    """sqrt(RSS / (n - 2)); NaN with 2 points."""
    max_abs_residual: float
    r2: float
    """1 - RSS/TSS of log S."""


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
    overhead: float = 0.2
    degradation: tuple[Degradation, ...] = ()
    diagnostics: Diagnostics | None = None
    warnings: tuple[str, ...] = ()
    n_censored: int = 0
    """Censored batches that entered the fit as lower bounds."""
    lack_of_fit: tuple[str, ...] = ()
    """Why the hyperbola does not describe this setting (cbs/analysis/fit_checks.py); then it is in no law."""
    cbs_bound: str = ""
    """Why the CBS is only a one-sided bound (not bracketed by the sweep); then it is in no CBS law."""
    b_noise_bound: str = ""
    """Why B_noise is only a one-sided bound; then it is in no B_noise or S_min law."""
    noise: NoiseLevel | None = None
    """The residual scale of log S its intervals (and censored likelihood) used: pooled over the study."""

    @property
    def fitted(self) -> bool:
        return math.isfinite(self.cbs)

    @property
    def cbs_exclusion(self) -> str:
        """Why the CBS laws leave this setting out ('' when it is a point in them)."""
        if not self.fitted:
            return self.note or "not fitted"
        if self.lack_of_fit:
            return "; ".join(self.lack_of_fit)
        return self.cbs_bound

    @property
    def b_noise_exclusion(self) -> str:
        """Why the B_noise and S_min laws leave this setting out ('' when it is a point in them)."""
        return self.cbs_exclusion if not self.fitted or self.lack_of_fit else self.b_noise_bound

    @property
    def b0_share(self) -> float:
        """(1 + o) B0 / B*: the part of the CBS set by the reference batch rather than by B_noise."""
        return (1 + self.overhead) * self.reference_batch / self.cbs if self.fitted else math.nan


def setting_rng(seed: int, name: str) -> np.random.Generator:
    """A generator per (seed, setting name): a setting's interval does not depend on which others exist."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def degradation_range(b_noise: float, b_noise_ci: tuple[float, float], reference_batch: float,
                      overheads=DEGRADATION_OVERHEADS) -> tuple[Degradation, ...]:
    """B(o) = (1 + o) B0 + o B_noise for each o: the batch at which S is (1 + o) x linear scaling from B0.

    B(o) is increasing and affine in B_noise, so its interval is B(o) at B_noise's limits.
    """
    return tuple(Degradation(float(o), float(critical_batch_size(b_noise, reference_batch, o)),
                             *(float(critical_batch_size(v, reference_batch, o)) for v in b_noise_ci))
                 for o in overheads)


def diagnostics(fit: HyperbolaFit, batch: np.ndarray, steps: np.ndarray) -> Diagnostics:
    y = np.log(steps)
    r = y - np.log(fit.steps(batch))
    tss = float(((y - y.mean()) ** 2).sum())
    return Diagnostics(batches=tuple(int(b) for b in batch), residuals=tuple(float(v) for v in r),
                       residual_sd=residual_scale(fit.rss, len(batch)), max_abs_residual=float(np.abs(r).max()),
                       r2=1.0 - fit.rss / tss if tss > 0 else math.nan)


def fit_warnings(fit: HyperbolaFit, batch: np.ndarray, cbs: float, reference_batch: float, overhead: float,
                 cbs_ci: tuple[float, float], bounds: list[StepsPoint] = ()) -> tuple[str, ...]:
    """What makes a setting's CBS less trustworthy than its interval says (docs/method.md, "Diagnostics")."""
    out = []
    for p in bounds:
        fitted = float(fit.steps(p.batch_size))
        if math.log(p.censored_at_steps / fitted) > BOUND_CONFLICT_Z * fit.sigma:
            out.append(f"at B={p.batch_size} no run reached the target in {p.censored_at_steps:.4g} steps, but the "
                       f"fit puts S there at {fitted:.4g}: the lower bound conflicts with the other batches (more "
                       f"than {BOUND_CONFLICT_Z:g} residual s.d. above the curve) and pulls the fit; check those runs")
    if fit.bound == 1:
        out.append(f"B_noise at the upper search bound: S ~ 1/B up to B={batch.max():g} (no saturation); "
                   "add larger batches")
    elif fit.bound == -1:
        out.append(f"B_noise at the lower search bound: S is flat from B={batch.min():g} on; B_noise is not "
                   "measured, add smaller batches")
    else:
        out += _bracket_warnings(fit.b_noise, batch, [p.batch_size for p in bounds])
    share = (1 + overhead) * reference_batch / cbs if math.isfinite(cbs) else math.nan
    if share >= B0_SHARE_WARNING:
        out.append(f"CBS ~ (1+o)B0: the reference-batch term {(1 + overhead) * reference_batch:.3g} is "
                   f"{share:.0%} of the CBS, an artefact of B0 more than a measure of B_noise; read the B_noise "
                   "law, or refit with a smaller --reference-batch")
    if math.isinf(cbs_ci[1]):
        out.append("CBS interval unbounded above: in more than 2.5% of bootstrap resamples S ~ 1/B throughout")
    return tuple(out)


def _bracket_warnings(b_noise: float, batch: np.ndarray, bound_batches: list[int]) -> list[str]:
    """Whether the sweep brackets B_noise, counting the censored batches (lower bounds S > cap) as measured."""
    everything = [*batch, *bound_batches]
    counted = f" ({len(bound_batches)} censored one(s) counted)" if bound_batches else ""
    if b_noise > max(everything):
        return [f"the sweep does not bracket B_noise={b_noise:.3g}: every batch is below it{counted}, so S_min is "
                "extrapolated; add larger batches"]
    if b_noise < min(everything):
        return [f"the sweep does not bracket B_noise={b_noise:.3g}: every batch is above it{counted}, so the 1/B "
                "regime is not measured; add smaller batches"]
    above = [b for b in bound_batches if b > b_noise]
    if b_noise > batch.max():
        return [f"B_noise={b_noise:.3g} is above every batch that reached the target; only the censored batch(es) "
                f"B={', '.join(f'{b:g}' for b in above)} above it bracket it, as lower bounds S > cap: train them "
                "longer"]
    below = [b for b in bound_batches if b < b_noise]
    if b_noise < batch.min():
        return [f"B_noise={b_noise:.3g} is below every batch that reached the target; only the censored batch(es) "
                f"B={', '.join(f'{b:g}' for b in below)} below it bracket it, as lower bounds S > cap: train them "
                "longer"]
    return []


def _fit_note(fit: HyperbolaFit, cbs: float, max_batch: float) -> str:
    notes = ["B_noise below the measured batch sizes (S nearly flat in B)"] if fit.bound == -1 else []
    if cbs > max_batch:
        notes.append(f"CBS above the largest usable batch ({max_batch:g}): extrapolated")
    return "; ".join(notes)


def estimate_setting(setting: Setting, points: list[StepsPoint], overhead: float,
                     reference_batch: float | None = None, n_resamples: int = 1000, seed: int = 0,
                     level: float = LEVEL, overheads=DEGRADATION_OVERHEADS, noise: NoiseLevel | None = None,
                     check_noise: NoiseLevel | None = None) -> CbsEstimate:
    """Fit S(B) (censored batches as lower bounds), then B* = (1 + o) B0 + o B_noise with intervals.

    B0 defaults to the smallest batch of the setting, censored or not: B0 only anchors the linear-scaling line
    S(B0) B0/B on the fitted curve, and a study's settings then share the B0 of their common batch grid, so that
    their CBS are comparable (a censored smallest batch would otherwise shift one setting's B0).
    `noise`: the study's pooled residual scale of log S for the intervals and the censored likelihood (None: the
    setting's own); `check_noise`: the other settings' pooled scale the lack-of-fit checks compare with (None:
    the setting's own, which only the monotonicity check can use). `fit_settings` gives both.
    """
    usable = [p for p in points if not p.censored]
    bounds = [p for p in points if p.lower_bound]
    batch = np.array([p.batch_size for p in usable], float)
    b0 = float(reference_batch) if reference_batch else float(min((p.batch_size for p in points), default=math.nan))
    base = dict(setting=setting, n_batches=len(usable), reference_batch=b0, overhead=overhead)
    if len(usable) < MIN_BATCHES:
        return CbsEstimate(**base, note=f"insufficient: {len(usable)} batch size(s) reached the target, "
                                         f"need >= {MIN_BATCHES}")
    steps = np.array([p.steps for p in usable], float)
    fit = fit_hyperbola(batch, steps, [p.batch_size for p in bounds], [p.censored_at_steps for p in bounds], noise)
    diag = diagnostics(fit, batch, steps)
    shape = lack_of_fit(batch, np.log(steps), np.log(fit.steps(batch)),
                        check_noise or NoiseLevel(diag.residual_sd, len(batch) - 2))
    if shape and check_noise is None:  # the own scale cannot judge the residual size: only monotonicity ran
        shape = tuple(w for w in shape if w.startswith("not monotone"))
    noise = _interval_noise(noise, diag, bool(shape))
    base.update(fit=fit, diagnostics=diag, n_censored=len(bounds), lack_of_fit=shape, noise=noise)
    if fit.bound == 1:
        return CbsEstimate(**base, warnings=shape + fit_warnings(fit, batch, math.nan, b0, overhead, NAN2, bounds)
                           + _b0_warning(reference_batch, [*batch, *(p.batch_size for p in bounds)]),
                           note=f"no saturation: S ~ 1/B up to B={batch.max():g}; CBS is beyond the measured "
                                "batch sizes")
    cbs = float(critical_batch_size(fit.b_noise, b0, overhead))
    observed = [*batch, *(p.batch_size for p in bounds)]
    base.update(s_min=fit.s_min, b_noise=fit.b_noise, cbs=cbs, note=_fit_note(fit, cbs, float(batch.max())),
                cbs_bound=cbs_bound(cbs, observed), b_noise_bound=b_noise_bound(fit.b_noise, observed))
    if n_resamples > 0:
        ci = bootstrap_hyperbola(batch, steps, fit, n_resamples, setting_rng(seed, setting.name), level,
                                 fit.censoring, noise)
        cbs_ci = tuple(float(critical_batch_size(v, b0, overhead)) for v in ci.b_noise)  # affine in B_noise
        base.update(s_min_ci=ci.s_min, b_noise_ci=ci.b_noise, cbs_ci=cbs_ci)
    return CbsEstimate(**base, degradation=degradation_range(fit.b_noise, base.get("b_noise_ci", NAN2), b0,
                                                             overheads),
                       warnings=shape + fit_warnings(fit, batch, cbs, b0, overhead, base.get("cbs_ci", NAN2),
                                                     bounds) + _b0_warning(reference_batch, observed))


def _b0_warning(reference_batch: float | None, observed: list[float]) -> tuple[str, ...]:
    """A --reference-batch outside the batches measured (reached or lower bound); the default B0, the
    setting's smallest batch, is its own choice."""
    warning = reference_batch_warning(reference_batch, observed) if reference_batch else ""
    return (warning,) if warning else ()


def _interval_noise(noise: NoiseLevel | None, diag: Diagnostics, lacks_fit: bool) -> NoiseLevel:
    """The scale of a setting's intervals: the pooled one, or the setting's own where that is larger and the
    hyperbola does not describe the setting (its own scatter is then real); its own without a pooled one."""
    own = NoiseLevel(diag.residual_sd, len(diag.batches) - 2, ())
    if noise is None or (lacks_fit and own.sigma > noise.sigma):
        return own
    return noise


# ----------------------------------------------------------------------------------------------------------------
# a whole study


def fit_settings(points_of, settings: list[Setting], overhead: float = 0.2, reference_batch: float | None = None,
                 n_resamples: int = 1000, seed: int = 0, level: float = LEVEL,
                 overheads=DEGRADATION_OVERHEADS) -> list[CbsEstimate]:
    """Every setting's fit; `points_of(name)` gives its points sorted by batch.

    Two passes: plain fits give each setting's residual sum of squares of log S; each setting is checked for
    lack of fit against the pooled scale of the *others*, and its intervals use the scale pooled over the
    settings that passed (cbs/analysis/fit_checks.py; docs/method.md, "Pooled noise level").
    """
    parts = {s.name: _residual_part(points_of(s.name)) for s in settings}
    parts = {k: v for k, v in parts.items() if v is not None}
    first = [estimate_setting(s, points_of(s.name), overhead, reference_batch, 0, seed, level, overheads,
                              check_noise=pooled_noise(parts, leave_out=(s.name,))) for s in settings]
    noise = pooled_noise(parts, leave_out=[e.setting.name for e in first if e.lack_of_fit])
    return [estimate_setting(s, points_of(s.name), overhead, reference_batch, n_resamples, seed, level, overheads,
                             noise=noise, check_noise=pooled_noise(parts, leave_out=(s.name,)))
            for s in settings]


def _residual_part(points: list[StepsPoint]) -> tuple[float, int] | None:
    """(RSS of log S, n - 2) of the plain fit at the reached points; None with fewer than MIN_BATCHES."""
    usable = [p for p in points if not p.censored]
    if len(usable) < MIN_BATCHES:
        return None
    batch = np.array([p.batch_size for p in usable], float)
    return fit_hyperbola(batch, np.array([p.steps for p in usable], float)).rss, len(usable) - 2
