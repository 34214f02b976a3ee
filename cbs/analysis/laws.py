"""Scaling laws over settings: log Y = log c + sum_j a_j log X_j, for Y in {CBS, B_noise, S_min} and X in
{D, N, C = 6 N D} one at a time, or (D, N) jointly; plain OLS and, for the CBS, WLS weighted by each setting's
interval (docs/method.md, "Scaling laws" and the sections after it).

Zhang et al. 2025 (arXiv 2410.21676, sec. 4) fit B* = c D^a and B* = c N^b one variable at a time. cbs adds:
- the joint law log B* = log c + a log D + b log N, fitted over all settings at once (as Hoffmann et al. 2022,
  arXiv 2203.15556, sec. 3.3, fit the loss in N and D jointly), identifiable only when log D and log N are not
  collinear: in the paper's Chinchilla design D = 20 N they are, and the split between a and b is arbitrary; such
  a law is marked not identifiable, with why (collinearity: R^2 of log D on log N, i.e. the variance inflation
  factor 1 / (1 - R^2) of either exponent);
- the compute law B* = c C^g, C = 6 N D, the form compute-optimal studies fit the batch size in (DeepSeek-AI
  2024, arXiv 2401.02954, sec. 3.1: B_opt = 0.292 C^0.327);
- laws on B_noise: B* = (1 + o) B0 + o B_noise has a floor (1 + o) B0 that flattens the exponent of B* whenever
  o B_noise is not >> (1 + o) B0, while B_noise itself has none;
- the weighted CBS law: log B*_i has measurement variance se_i^2 = ((log hi_i - log lo_i) / (2 z_q))^2 from its
  bootstrap interval; WLS with weights 1 / se_i^2 (statsmodels estimates the common scale, so intervals stay
  honest when the bootstrap se are off by a factor). Settings with an unbounded interval get weight 0. Only
  where the weights can be trusted (`untrusted_weights`): intervals at one pooled noise level.
Only settings whose CBS (for the B_noise and S_min laws: whose B_noise) the sweep brackets and whose S(B) the
hyperbola describes are points in a law (CbsEstimate.cbs_exclusion / b_noise_exclusion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
from scipy import stats

from cbs.analysis.fit import LEVEL, CbsEstimate

SYMBOLS = {"tokens": "D", "model_params": "N", "compute": "C"}
VARIABLE_NAMES = {"tokens": "data tokens D", "model_params": "non-embedding parameters N",
                  "compute": "compute C = 6ND (FLOPs)"}
JOINT = ("tokens", "model_params")
JOINT_KEYS = {"tokens": "tokens", "model_params": "params"}
"""scaling.json names of the joint law's variables (`exponents: {tokens: a, params: b}`)."""
RESPONSES = {"cbs": "CBS", "b_noise": "B_noise", "s_min": "S_min"}
SE_FLOOR = 0.01
"""Smallest se of log CBS a weight may assume (1%): a zero-width interval (noiseless points) must not take all
the weight."""
WEIGHT_MIN_DOF = 10
"""Residual dof each setting's own noise scale needs before its interval may set a weight (relative s.d. of the
scale estimate ~1/sqrt(2 dof) = 22%)."""
COLLINEAR_R2 = 0.99
"""R^2 of log D on log N at or above which the joint law is not identifiable (variance inflation >= 100: the
standard error of each exponent is >= 10x what an orthogonal design of the same spread would give)."""


@dataclass(frozen=True)
class PowerLaw:
    """log Y = log c + sum_j a_j log X_j (natural logs), enough to forecast with a prediction interval.

    Prediction at x (a new setting, not the mean line): log Y(x) ~ xi' beta +- t_{df, q} sqrt(xi' V xi + s^2),
    xi = (1, log x_1, ...), V = cov(beta), s^2 = residual variance of one setting (standard OLS prediction
    interval; for WLS, s^2 is the fitted scale times the mean of 1/w_i). With as many points as parameters
    (df = 0) the fit is exact and every interval is NaN.
    """

    response: str
    variables: tuple[str, ...]
    params: tuple[float, ...]
    """(log c, a_1, ..., a_k)."""
    cov: tuple[tuple[float, ...], ...]
    residual_variance: float
    df_resid: int
    r2: float
    n_points: int
    x_ranges: tuple[tuple[float, float], ...]
    settings: tuple[str, ...] = ()
    pooled: bool = False
    """One-variable law whose other variable (N for D, D for N) also varies across the points."""
    weighted: bool = False
    level: float = LEVEL
    identifiable: bool = True
    reason: str = ""
    """Why the law is not identifiable (then every number is NaN)."""

    # -- one-variable accessors (the D, N and C laws) --
    @property
    def variable(self) -> str:
        return self.variables[0] if len(self.variables) == 1 else "joint"

    @property
    def symbol(self) -> str:
        return "".join(SYMBOLS.get(v, v) for v in self.variables) if len(self.variables) == 1 else "D,N"

    @property
    def log_coefficient(self) -> float:
        return self.params[0]

    @property
    def coefficient(self) -> float:
        return math.exp(self.params[0]) if math.isfinite(self.params[0]) else math.nan

    @property
    def exponent(self) -> float:
        return self.params[1]

    @property
    def x_range(self) -> tuple[float, float]:
        return self.x_ranges[0]

    @property
    def exponent_ci(self) -> tuple[float, float]:
        return self.param_ci(1)

    @property
    def exponents(self) -> dict[str, float]:
        return dict(zip(self.variables, self.params[1:]))

    @property
    def exponents_ci(self) -> dict[str, tuple[float, float]]:
        return {v: self.param_ci(j + 1) for j, v in enumerate(self.variables)}

    @property
    def coefficient_ci(self) -> tuple[float, float]:
        lo, hi = self.param_ci(0)
        return math.exp(lo) if math.isfinite(lo) else math.nan, math.exp(hi) if math.isfinite(hi) else math.nan

    def _t(self, level: float) -> float:
        return float(stats.t.ppf((1 + level) / 2, self.df_resid)) if self.df_resid > 0 else math.nan

    def param_ci(self, j: int, level: float | None = None) -> tuple[float, float]:
        half = self._t(level or self.level) * math.sqrt(self.cov[j][j])
        return self.params[j] - half, self.params[j] + half

    def formula(self) -> str:
        y = RESPONSES.get(self.response, self.response)
        terms = " ".join(f"{SYMBOLS[v]}^{'ab'[j] if len(self.variables) > 1 else 'alpha'}"
                         for j, v in enumerate(self.variables))
        return f"{y} = c {terms}"

    def fitted_formula(self) -> str:
        """The right-hand side with its numbers: '0.0192 * D^0.452', '0.0189 * D^0.451 * N^0.002' (joint)."""
        exps = " * ".join(f"{SYMBOLS[v]}^{a:.3f}" for v, a in zip(self.variables, self.params[1:]))
        return f"{self.coefficient:.4g} * {exps}"

    def predict(self, x, prediction: bool = True, level: float | None = None):
        """(point, low, high) of Y at x (a value or array; a tuple of them for the joint law, in `variables`
        order); `prediction=False` gives the confidence band of the mean line."""
        xs = (x,) if len(self.variables) == 1 else tuple(x)
        logs = [np.log(np.asarray(v, float)) for v in xs]
        xi = np.stack(np.broadcast_arrays(np.ones_like(logs[0]), *logs), axis=-1)
        mean = xi @ np.array(self.params)
        var = np.einsum("...i,ij,...j->...", xi, np.array(self.cov), xi)
        var = var + (self.residual_variance if prediction else 0.0)
        half = self._t(level or self.level) * np.sqrt(var)
        return np.exp(mean), np.exp(mean - half), np.exp(mean + half)

    def in_range(self, x) -> bool:
        xs = (x,) if len(self.variables) == 1 else tuple(x)
        return all(lo <= v <= hi for v, (lo, hi) in zip(xs, self.x_ranges))


def not_identifiable(response: str, variables: tuple[str, ...], reason: str, settings=(), weighted=False,
                     level: float = LEVEL) -> PowerLaw:
    k = len(variables) + 1
    nan = math.nan
    return PowerLaw(response, variables, (nan,) * k, tuple((nan,) * k for _ in range(k)), nan, 0, nan,
                    len(settings), tuple((nan, nan) for _ in variables), tuple(settings), weighted=weighted,
                    level=level, identifiable=False, reason=reason)


def fit_power_law(xs: dict[str, np.ndarray], y, response: str, settings=(), weights=None, pooled: bool = False,
                  level: float = LEVEL) -> PowerLaw | None:
    """OLS (or WLS with `weights`) of log y on log x_j (statsmodels); None when some x_j takes one value or
    there are fewer points than parameters."""
    import statsmodels.api as sm  # ~0.5 s to import; `cbs forecast` never needs it

    names = tuple(xs)
    x = np.column_stack([np.log(np.asarray(xs[v], float)) for v in names])
    y = np.log(np.asarray(y, float))
    w = np.ones(len(y)) if weights is None else np.asarray(weights, float)
    keep = w > 0
    x, y, w = x[keep], y[keep], w[keep]
    if len(y) < len(names) + 1 or any(len(np.unique(col)) < 2 for col in x.T):
        return None
    res = sm.WLS(y, sm.add_constant(x, has_constant="add"), weights=w).fit()
    df = int(round(res.df_resid))
    k = len(names) + 1
    cov = np.asarray(res.cov_params()) if df > 0 else np.full((k, k), math.nan)
    resid_var = float(res.scale * np.mean(1.0 / w)) if df > 0 else math.nan
    tss = float(np.sum(w * (y - np.average(y, weights=w)) ** 2))
    r2 = 1.0 - float(np.sum(w * res.resid ** 2)) / tss if df > 0 and tss > 0 else 1.0
    raw = [np.asarray(xs[v], float)[keep] for v in names]
    return PowerLaw(response, names, tuple(float(p) for p in res.params),
                    tuple(tuple(float(v) for v in row) for row in cov), resid_var, df, r2, len(y),
                    tuple((float(r.min()), float(r.max())) for r in raw),
                    tuple(s for s, kept in zip(settings, keep) if kept), pooled, weights is not None, level)


def fit_scaling_law(x, cbs, variable: str, settings=(), pooled: bool = False, level: float = LEVEL,
                    response: str = "cbs", weights=None) -> PowerLaw | None:
    """One-variable law Y = c X^alpha (OLS in log space; WLS with weights); None with < 2 distinct X."""
    return fit_power_law({variable: x}, cbs, response, settings, weights, pooled, level)


# ----------------------------------------------------------------------------------------------------------------
# collinearity of D and N


@dataclass(frozen=True)
class Collinearity:
    """How much of log D's spread across settings log N explains (the paper's design D = 20 N: all of it)."""

    r2: float
    """R^2 of log D on log N (NaN when one of them takes a single value)."""
    slope: float
    """log D = slope log N + const by least squares (1 for a fixed tokens-per-parameter ratio)."""
    ratio: float
    """Geometric mean of D / N."""

    @property
    def collinear(self) -> bool:
        return math.isfinite(self.r2) and self.r2 >= COLLINEAR_R2

    def describe(self) -> str:
        return (f"log D and log N are collinear across the fitted settings (R^2 = {self.r2:.3f}, "
                f"D ~ {self.ratio:.3g} N^{self.slope:.2f}): their effects on the CBS cannot be separated")


def collinearity(model_params, tokens) -> Collinearity:
    ln, ld = np.log(np.asarray(model_params, float)), np.log(np.asarray(tokens, float))
    ratio = float(np.exp(np.mean(ld - ln))) if len(ln) else math.nan
    if len(ln) < 2 or np.ptp(ln) == 0 or np.ptp(ld) == 0:
        return Collinearity(math.nan, math.nan, ratio)
    r = float(np.corrcoef(ln, ld)[0, 1])
    slope = float(np.polyfit(ln, ld, 1)[0])
    return Collinearity(r * r, slope, ratio)


# ----------------------------------------------------------------------------------------------------------------
# every law of a study


@dataclass
class LawSet:
    """All laws over the fitted settings, keyed by variable ('tokens', 'model_params', 'compute', 'joint')."""

    cbs: dict[str, PowerLaw] = field(default_factory=dict)
    cbs_weighted: dict[str, PowerLaw] = field(default_factory=dict)
    b_noise: dict[str, PowerLaw] = field(default_factory=dict)
    s_min: dict[str, PowerLaw] = field(default_factory=dict)
    excluded: list[tuple[str, str]] = field(default_factory=list)
    """(setting, why) of the settings the CBS laws leave out (a one-sided CBS, lack of fit, no fit)."""
    excluded_b_noise: list[tuple[str, str]] = field(default_factory=list)
    """(setting, why) of the settings in the CBS laws that the B_noise and S_min laws leave out (B_noise a
    one-sided bound)."""
    unweighted: list[tuple[str, str]] = field(default_factory=list)
    """(setting, why) of the fitted settings the weighted laws give weight 0."""
    collinearity: Collinearity | None = None
    weighted_note: str = ""
    """Why there are no weighted laws although the settings have intervals (then the plain OLS laws stand)."""

    def families(self) -> dict[str, dict[str, PowerLaw]]:
        return {"cbs": self.cbs, "cbs_weighted": self.cbs_weighted, "b_noise": self.b_noise, "s_min": self.s_min}


def log_interval_se(ci: tuple[float, float], level: float = LEVEL) -> float:
    """se of log B* from its interval: (log hi - log lo) / (2 z_q); inf when the interval is open or missing."""
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi) and lo > 0 and hi > lo):
        return math.inf
    return (math.log(hi) - math.log(lo)) / (2 * NormalDist().inv_cdf((1 + level) / 2))


def _family(ok: list[CbsEstimate], y, response: str, coll: Collinearity, weights=None,
            level: float = LEVEL) -> dict[str, PowerLaw]:
    """The D, N and C laws of one response, and the joint law (or why it is not identifiable)."""
    names = [e.setting.name for e in ok]
    x = {"tokens": [e.setting.tokens for e in ok], "model_params": [e.setting.model_params for e in ok],
         "compute": [e.setting.compute for e in ok]}
    laws = {}
    for variable, other in (("tokens", "model_params"), ("model_params", "tokens"), ("compute", None)):
        pooled = other is not None and len(set(x[other])) > 1
        law = fit_power_law({variable: x[variable]}, y, response, names, weights, pooled, level)
        if law is not None:
            laws[variable] = law
    if laws:
        laws["joint"] = _joint(x, y, response, names, coll, weights, level)
    return laws


def _joint(x: dict, y, response: str, names: list[str], coll: Collinearity, weights, level: float) -> PowerLaw:
    weighted = weights is not None
    for v in JOINT:
        if len(set(x[v])) < 2:
            return not_identifiable(response, JOINT, f"{SYMBOLS[v]} takes a single value across the fitted "
                                    "settings", names, weighted, level)
    if coll.collinear:
        return not_identifiable(response, JOINT, coll.describe(), names, weighted, level)
    law = fit_power_law({v: x[v] for v in JOINT}, y, response, names, weights, False, level)
    if law is None:
        return not_identifiable(response, JOINT, f"{len(names)} settings for 3 parameters", names, weighted, level)
    return law


def fit_laws(estimates: list[CbsEstimate], level: float = LEVEL) -> LawSet:
    """Every law over the settings whose CBS (for B_noise and S_min: whose B_noise) the sweep brackets and the
    hyperbola describes; what is left out is listed with why (docs/method.md, "What enters a law")."""
    ok = [e for e in estimates if not e.cbs_exclusion]
    noise_ok = [e for e in estimates if not e.b_noise_exclusion]
    out = LawSet(excluded=[(e.setting.name, e.cbs_exclusion) for e in estimates if e.cbs_exclusion],
                 excluded_b_noise=[(e.setting.name, e.b_noise_exclusion) for e in estimates
                                   if e.b_noise_exclusion and not e.cbs_exclusion])
    if noise_ok:
        coll = collinearity([e.setting.model_params for e in noise_ok], [e.setting.tokens for e in noise_ok])
        out.b_noise = _family(noise_ok, [e.b_noise for e in noise_ok], "b_noise", coll, level=level)
        out.s_min = _family(noise_ok, [e.s_min for e in noise_ok], "s_min", coll, level=level)
        out.collinearity = coll
    if not ok:
        return out
    coll = collinearity([e.setting.model_params for e in ok], [e.setting.tokens for e in ok])
    out.collinearity = coll
    out.cbs = _family(ok, [e.cbs for e in ok], "cbs", coll, level=level)
    _weighted(out, ok, coll, level)
    return out


def untrusted_weights(ok: list[CbsEstimate]) -> str:
    """Why weights 1/se_i^2 from the settings' intervals cannot be trusted ('' when they can).

    Intervals computed at one pooled noise level differ only by each setting's design (its batches and where its
    B_noise falls), so their ratios are known without noise. Intervals each at the setting's own residual scale
    are as noisy as that scale: with 1-2 dof (3-4 batches) the weights are mostly noise, correlate with the
    residuals, and the weighted laws covered 68-83% and scattered more than OLS in simulation; so those need
    WEIGHT_MIN_DOF dof each.
    """
    if any(e.noise is None for e in ok):
        return "some CBS intervals record no noise level"
    if len({e.noise for e in ok}) == 1:
        return ""
    few = [e.setting.name for e in ok if e.noise.dof < WEIGHT_MIN_DOF]
    if few:
        return (f"the intervals of {len(few)} setting(s) rest on their own residual scale with fewer than "
                f"{WEIGHT_MIN_DOF} dof, not on one pooled scale: their widths, hence the weights, are mostly noise")
    return ""


def _weighted(out: LawSet, ok: list[CbsEstimate], coll: Collinearity, level: float) -> None:
    """The WLS CBS laws, weights 1/se_i^2 from each setting's interval, where those weights can be trusted."""
    out.weighted_note = untrusted_weights(ok)
    if out.weighted_note:
        return
    se = np.array([log_interval_se(e.cbs_ci, level) for e in ok])
    out.unweighted = [(e.setting.name, "no interval (--bootstrap 0)" if math.isnan(e.cbs_ci[0]) else
                       f"CBS interval [{e.cbs_ci[0]:.4g}, {e.cbs_ci[1]:.4g}] is open") for e, s in zip(ok, se)
                      if not math.isfinite(s)]
    if np.isfinite(se).sum() >= 2:
        weights = np.where(np.isfinite(se), 1.0 / np.maximum(se, SE_FLOOR) ** 2, 0.0)
        out.cbs_weighted = _family(ok, [e.cbs for e in ok], "cbs", coll, weights, level)


# ----------------------------------------------------------------------------------------------------------------
# scaling.json entries


def json_num(v) -> float | None:
    """JSON has no NaN/inf: write null."""
    return float(v) if v is not None and math.isfinite(v) else None


def _nums(values) -> list:
    return [json_num(v) for v in values]


def law_to_json(law: PowerLaw) -> dict:
    """The scaling.json entry of one law (natural logs; NaN -> null).

    A one-variable law keeps the keys of scaling.json version 1 (`variable`, `exponent`, `exponent_ci`, ...);
    the joint law has `variables`, `exponents: {tokens: a, params: b}` and `exponents_ci` in the same shape.
    """
    common = {
        "response": law.response, "formula": law.formula(), "weighted": law.weighted,
        "identifiable": law.identifiable, "reason": law.reason or None,
        "coefficient": json_num(law.coefficient), "coefficient_ci": _nums(law.coefficient_ci),
        "log_coefficient": json_num(law.log_coefficient), "level": law.level, "r2": json_num(law.r2),
        "n_points": law.n_points, "df_resid": law.df_resid, "residual_variance": json_num(law.residual_variance),
        "settings": list(law.settings),
    }
    if len(law.variables) == 1:
        return {"variable": law.variable, "symbol": law.symbol, **common, "exponent": json_num(law.exponent),
                "exponent_ci": _nums(law.exponent_ci), "cov_log_coefficient_exponent": [_nums(r) for r in law.cov],
                "x_range": _nums(law.x_range), "pooled_over_other_variable": law.pooled}
    keys = [JOINT_KEYS.get(v, v) for v in law.variables]
    return {"variables": keys, "symbols": {k: SYMBOLS[v] for k, v in zip(keys, law.variables)}, **common,
            "exponents": {k: json_num(a) for k, a in zip(keys, law.params[1:])},
            "exponents_ci": {k: _nums(law.param_ci(j + 1)) for j, k in enumerate(keys)},
            "cov": [_nums(r) for r in law.cov], "x_ranges": {k: _nums(r) for k, r in zip(keys, law.x_ranges)}}


def _f(v) -> float:
    return math.nan if v is None else float(v)


def law_from_json(d: dict) -> PowerLaw:
    """Inverse of law_to_json (version 1 entries read too); KeyError/TypeError/ValueError on a malformed entry."""
    if not isinstance(d, dict):
        raise TypeError(f"expected a mapping, got {type(d).__name__}")
    if "variables" in d:
        return _joint_from_json(d)
    cov = d["cov_log_coefficient_exponent"]
    law = PowerLaw(response=str(d.get("response", "cbs")), variables=(str(d["variable"]),),
                   params=(float(d["log_coefficient"]), float(d["exponent"])),
                   cov=tuple(tuple(_f(v) for v in cov[i][:2]) for i in range(2)),
                   residual_variance=_f(d["residual_variance"]), df_resid=int(d["df_resid"]), r2=_f(d["r2"]),
                   n_points=int(d["n_points"]), x_ranges=((float(d["x_range"][0]), float(d["x_range"][1])),),
                   settings=tuple(d.get("settings", ())), pooled=bool(d.get("pooled_over_other_variable")),
                   weighted=bool(d.get("weighted")), level=float(d.get("level", LEVEL)))
    if law.variable not in SYMBOLS:
        raise ValueError(f"unknown variable {law.variable!r}")
    if not (math.isfinite(law.log_coefficient) and math.isfinite(law.exponent)) or law.df_resid < 0:
        raise ValueError("log_coefficient and exponent must be finite numbers")
    return law


def _joint_from_json(d: dict) -> PowerLaw:
    back = {k: v for v, k in JOINT_KEYS.items()}
    keys = list(d["variables"])
    if sorted(keys) != sorted(JOINT_KEYS.values()):
        raise ValueError(f"variables must be {list(JOINT_KEYS.values())}: got {keys}")
    variables = tuple(back[k] for k in keys)
    if not d.get("identifiable", True):
        return not_identifiable(str(d.get("response", "cbs")), variables, str(d.get("reason") or ""),
                                tuple(d.get("settings", ())), bool(d.get("weighted")), float(d.get("level", LEVEL)))
    params = (float(d["log_coefficient"]), *(float(d["exponents"][k]) for k in keys))
    if not all(math.isfinite(p) for p in params):
        raise ValueError("log_coefficient and exponents must be finite numbers")
    cov = d["cov"]
    return PowerLaw(response=str(d.get("response", "cbs")), variables=variables, params=params,
                    cov=tuple(tuple(_f(v) for v in cov[i][:3]) for i in range(3)),
                    residual_variance=_f(d["residual_variance"]), df_resid=int(d["df_resid"]), r2=_f(d["r2"]),
                    n_points=int(d["n_points"]),
                    x_ranges=tuple((float(d["x_ranges"][k][0]), float(d["x_ranges"][k][1])) for k in keys),
                    settings=tuple(d.get("settings", ())), weighted=bool(d.get("weighted")),
                    level=float(d.get("level", LEVEL)))
