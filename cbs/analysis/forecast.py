"""Forecast the critical batch size of a new data budget and/or model size from scaling.json, plan a batch, and
(with throughput) the batch that reaches the target fastest on a GPU budget.

CBS(x) = c x^alpha (or c D^a N^b with the joint law) with an OLS prediction interval on the log scale (see
laws.PowerLaw.predict). Which law: the joint law when both D and N are given and it is identifiable; otherwise
the D law (or the N law with only N), saying why. The batch plan takes the largest global batch <= CBS that is
a whole number of micro-batches on every GPU (global = k * gpus * micro_batch, gradient accumulation k), so that
every step is still in the near-linear-scaling regime: at B* a step already buys only 1/(1 + o) of what linear
scaling promises. With the B_noise law (`--law b_noise`, docs/method.md "B_noise law"): CBS = (1 + o) B0 +
o B_noise(x), its interval mapped through the same increasing line. The time plan (docs/method.md, "Time and
cost") uses S(B) = S_min(x) (1 + B_noise(x) / B) from the S_min and B_noise laws of the same variables, over
batches up to the CBS unless told to go beyond.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from cbs.analysis import InputError, csv_float, csv_dicts, read_csv_lines
from cbs.analysis.cost import (
    ThroughputModel, ThroughputPoint, TimeToTarget, fastest, hours_text, plan_rows, time_row,
)
from cbs.analysis.fit import critical_batch_size
from cbs.analysis.laws import SYMBOLS, PowerLaw, law_from_json
from cbs.analysis.study_fit import EXPONENT_GAP
from cbs.batching import BatchLayout, gradient_accumulation

DEFAULT_SEQ_LEN = 512  # the paper's context length (Zhang et al. 2025, sec. 2)
DEFAULT_OVERHEAD = 0.2
"""o of CBS = (1 + o) B0 + o B_noise for a scaling.json that does not record the fit's (`cbs fit --overhead`)."""
LAW_FAMILIES = ("laws", "laws_weighted", "laws_b_noise", "laws_s_min")
RATIO_WARNING = 2.0
"""With collinear D and N, warn when the asked D/N is this far (either way) from the fitted settings' ratio."""


@dataclass(frozen=True)
class ScalingFile:
    """What forecast needs from scaling.json."""

    laws: dict[str, PowerLaw]
    seq_len: int | None
    overhead: float | None
    path: str
    version: int = 1
    b_noise: dict[str, PowerLaw] = field(default_factory=dict)
    s_min: dict[str, PowerLaw] = field(default_factory=dict)
    throughput: tuple[ThroughputPoint, ...] = ()
    tokens_per_param: float | None = None
    """Geometric mean D/N of the fitted settings when D and N are collinear (None otherwise)."""
    reference_batch: float | None = None
    """The fit's --reference-batch B0 (None: each setting's smallest batch; see fitted_reference_batch)."""


def load_scaling(path: str | Path) -> ScalingFile:
    """Read and check scaling.json; InputError with the reason when missing or malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file (write it with `cbs fit ... --out DIR`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read JSON: {e}; rewrite it with `cbs fit`") from None
    if not isinstance(data, dict) or not isinstance(data.get("laws"), dict):
        raise InputError(f"{path}: not a scaling.json written by `cbs fit` (no 'laws' mapping); rewrite it with "
                         "`cbs fit`")
    families = {name: _read_laws(path, name, data.get(name)) for name in LAW_FAMILIES}
    seq_len = data.get("seq_len")
    seq_len = seq_len if isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len > 0 else None
    overhead = data.get("overhead") if isinstance(data.get("overhead"), (int, float)) else None
    version = data.get("version") if isinstance(data.get("version"), int) else 1
    coll = data.get("collinearity") if isinstance(data.get("collinearity"), dict) else {}
    ratio = coll.get("tokens_per_param") if coll.get("collinear") else None
    return ScalingFile(laws=families["laws"], seq_len=seq_len, overhead=overhead, path=str(path), version=version,
                       b_noise=families["laws_b_noise"], s_min=families["laws_s_min"],
                       throughput=_read_throughput(path, data.get("throughput")),
                       tokens_per_param=float(ratio) if isinstance(ratio, (int, float)) else None,
                       reference_batch=_positive(data.get("reference_batch")))


def _positive(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def _read_laws(path: Path, family: str, entries) -> dict[str, PowerLaw]:
    if entries is None and family != "laws":
        return {}  # version 1 has only `laws`
    if not isinstance(entries, dict):
        raise InputError(f"{path}: {family} must be a mapping of laws; rewrite the file with `cbs fit`")
    laws = {}
    for name, entry in entries.items():
        try:
            laws[name] = law_from_json(entry)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise InputError(f"{path}: {family}.{name} is malformed ({type(e).__name__}: {e}); rewrite the file "
                             "with `cbs fit`") from None
    return laws


def _read_throughput(path: Path, entry) -> tuple[ThroughputPoint, ...]:
    if entry is None:
        return ()
    try:
        points = []
        for i, p in enumerate(entry["points"]):
            n = p.get("model_params")
            point = ThroughputPoint(None if n is None else int(n), int(p["batch_size"]), int(p["gpus"]),
                                    float(p["tokens_per_s"]))
            if not (point.batch_size > 0 and point.gpus > 0 and math.isfinite(point.tokens_per_s)
                    and point.tokens_per_s > 0):
                raise ValueError(f"point {i} is not positive: {p}")
            points.append(point)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{path}: throughput is malformed ({type(e).__name__}: {e}); rewrite the file with "
                         "`cbs fit`") from None
    return tuple(points)


# ----------------------------------------------------------------------------------------------------------------
# which law, and the CBS


@dataclass(frozen=True)
class Forecast:
    variable: str
    """'tokens', 'model_params', 'compute' or 'joint'."""
    x: tuple[float, ...]
    cbs: float
    low: float
    high: float
    """Prediction interval (NaN when the law was fitted through as many points as it has parameters)."""
    level: float
    extrapolated: bool
    """x outside the range of the settings the law was fitted on."""


def forecast_cbs(law: PowerLaw, x) -> Forecast:
    """Y = c x^alpha (or c D^a N^b) with the law's prediction interval (a new setting, not the mean line)."""
    xs = tuple(float(v) for v in (x if isinstance(x, (tuple, list)) else (x,)))
    point, low, high = (float(v) for v in law.predict(xs[0] if len(xs) == 1 else xs))
    return Forecast(law.variable, xs, point, low, high, law.level, not law.in_range(xs[0] if len(xs) == 1 else xs))


@dataclass(frozen=True)
class Choice:
    key: str
    x: tuple[float, ...]
    notes: tuple[str, ...] = ()


def choose_law(sf: ScalingFile, tokens: float | None, model_params: float | None) -> Choice:
    """The joint law for (D, N) when identifiable; else the D law; else the N law (module docstring)."""
    notes = []
    if tokens and model_params:
        joint = sf.laws.get("joint")
        if joint is None and sf.version < 2 and {"tokens", "model_params"} <= set(sf.laws):
            raise InputError(f"{sf.path}: written by an older `cbs fit` (version {sf.version}) without a joint law "
                             "in (D, N); re-run `cbs fit` on the study, or drop --model-params to use the D law")
        if joint is not None and joint.identifiable:
            return Choice("joint", (tokens, model_params))
        if joint is not None:
            notes.append(f"note: no joint law: {joint.reason}; using the one-variable law")
            notes += _ratio_note(sf, tokens, model_params)
    if tokens and "tokens" in sf.laws:
        if model_params and "model_params" not in sf.laws and not notes:
            notes.append("note: scaling.json has no N law (its settings had one model size); N is not used")
        return Choice("tokens", (tokens,), tuple(notes))
    if "model_params" in sf.laws:
        if not model_params:
            raise InputError(f"{sf.path}: has only an N law (its settings had one data budget); give --model-params")
        return Choice("model_params", (model_params,), tuple(notes))
    raise InputError(f"{sf.path}: no scaling law (the fit had a single D and a single N); nothing to forecast")


def _ratio_note(sf: ScalingFile, tokens: float, model_params: float) -> list[str]:
    ratio = sf.tokens_per_param
    if not ratio or max(tokens / model_params / ratio, ratio * model_params / tokens) < RATIO_WARNING:
        return []
    return [f"note: the fitted settings all have D ~ {ratio:.3g} N, this forecast D = {tokens / model_params:.3g} N; "
            "the D law carries that ratio's N, so the forecast is an extrapolation off the fitted design"]


def _fmt(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _at(law: PowerLaw, x: tuple[float, ...]) -> str:
    return ", ".join(f"{SYMBOLS[v]}={val:.4g}" for v, val in zip(law.variables, x))


def describe(f: Forecast, law: PowerLaw) -> str:
    """One line: CBS forecast, interval, law and extrapolation warning."""
    interval = (f"{f.level:.0%} prediction interval [{_fmt(f.low)}, {_fmt(f.high)}]"
                if math.isfinite(f.low) else "no interval (law fitted through as many points as parameters)")
    where = ""
    if f.extrapolated:
        ranges = ", ".join(f"{SYMBOLS[v]} [{lo:.3g}, {hi:.3g}]" for v, (lo, hi) in zip(law.variables, law.x_ranges))
        where = f"; extrapolated beyond the fitted {ranges}"
    return (f"CBS({_at(law, f.x)}) = {_fmt(f.cbs)} sequences, {interval}; law CBS = {law.fitted_formula()} "
            f"(n={law.n_points}){where}")


def also_lines(sf: ScalingFile, choice: Choice, tokens: float, model_params: float | None) -> list[str]:
    """The other laws' forecasts at the same point, for comparison."""
    x = {"tokens": (tokens,), "model_params": (model_params,),
         "compute": (6.0 * tokens * model_params,) if model_params else None}
    lines = []
    for key, name in (("tokens", "the D law"), ("model_params", "the N law"), ("compute", "the compute law")):
        if key == choice.key or key not in sf.laws or not x[key] or not x[key][0]:
            continue
        if choice.key == "tokens" and key == "compute" and model_params is None:
            continue
        lines.append(f"also, from {name} (the plan uses the {_law_name(choice.key)}): "
                     + describe(forecast_cbs(sf.laws[key], x[key]), sf.laws[key]))
    return lines


def _law_name(key: str) -> str:
    return {"joint": "joint law", "tokens": "D law", "model_params": "N law", "compute": "compute law"}[key]


# ----------------------------------------------------------------------------------------------------------------
# the CBS from the B_noise law


def b_noise_gap(sf: ScalingFile, key: str) -> str | None:
    """Why the fit's report recommends the B_noise law for `key` (its warning, study_fit.EXPONENT_GAP), or None."""
    cbs, noise = sf.laws.get(key), sf.b_noise.get(key)
    if key == "joint" or cbs is None or noise is None or not (cbs.identifiable and noise.identifiable):
        return None
    if abs(cbs.exponent - noise.exponent) <= EXPONENT_GAP:
        return None
    bends = "flattens" if cbs.exponent < noise.exponent else "bends"
    return (f"the CBS law's exponent in {SYMBOLS[key]} ({cbs.exponent:.3f}) differs from the B_noise law's "
            f"({noise.exponent:.3f}): the (1+o)B0 floor of the CBS {bends} it")


def fitted_reference_batch(sf: ScalingFile) -> float | None:
    """The fit's B0: scaling.json's reference_batch, else the median reference_batch of the settings in the laws
    (cbs.csv beside scaling.json, as `cbs fit` writes them); None when neither says."""
    if sf.reference_batch is not None:
        return sf.reference_batch
    path = Path(sf.path).parent / "cbs.csv"
    if not path.is_file():
        return None
    rows = csv_dicts(read_csv_lines(path, str(path)))
    b0s = sorted(csv_float(r.get("reference_batch")) for r in rows if r.get("in_laws") == "1")
    b0s = [b for b in b0s if math.isfinite(b) and b > 0]
    return b0s[len(b0s) // 2] if b0s else None


@dataclass(frozen=True)
class NoiseForecast:
    """CBS = (1 + o) B0 + o B_noise(x) (docs/method.md, "B_noise law"): the B_noise forecast and the CBS it gives."""

    b_noise: Forecast
    cbs: Forecast
    reference_batch: float
    overhead: float


def forecast_from_b_noise(sf: ScalingFile, choice: Choice, reference_batch: float | None,
                          overhead: float) -> NoiseForecast:
    """The CBS at choice.x from the B_noise law of the same variables, at B0 (given, else the fit's)."""
    law = sf.b_noise.get(choice.key)
    if law is None or not law.identifiable:
        raise InputError(f"{sf.path}: no B_noise law in {_law_name(choice.key)[:-4]} to forecast with; use the "
                         "CBS law (drop --law b_noise) or re-run `cbs fit`")
    b0 = reference_batch or fitted_reference_batch(sf)
    if b0 is None:
        raise InputError("--law b_noise needs the reference batch B0 of CBS = (1 + o) B0 + o B_noise: give "
                         "--reference-batch B0 (the fit's is in cbs.csv, column reference_batch)")
    noise = forecast_cbs(law, choice.x)
    cbs = [float(critical_batch_size(v, b0, overhead)) if math.isfinite(v) else math.nan
           for v in (noise.cbs, noise.low, noise.high)]
    return NoiseForecast(noise, Forecast(noise.variable, noise.x, *cbs, noise.level, noise.extrapolated), b0,
                         overhead)


def describe_noise(nf: NoiseForecast, law: PowerLaw, lead: str) -> str:
    f, b = nf.cbs, nf.b_noise
    interval = (f"{f.level:.0%} prediction interval [{_fmt(f.low)}, {_fmt(f.high)}]" if math.isfinite(f.low)
                else "no interval (law fitted through as many points as parameters)")
    return (f"{lead}CBS({_at(law, f.x)}) = {_fmt(f.cbs)} sequences, {interval}; = (1 + {nf.overhead:g}) x B0 "
            f"{nf.reference_batch:g} + {nf.overhead:g} x B_noise {_fmt(b.cbs)}, law B_noise = "
            f"{law.fitted_formula()} (n={law.n_points})"
            + ("; extrapolated beyond the fitted range" if f.extrapolated else ""))


# ----------------------------------------------------------------------------------------------------------------
# batch plan


@dataclass(frozen=True)
class BatchPlan:
    global_batch_seqs: int
    micro_batch_seqs: int
    gpus: int
    grad_accum: int
    seq_len: int
    above_cbs: bool
    """True when even one micro-batch on every GPU exceeds the CBS."""

    @property
    def layout(self) -> BatchLayout:
        return BatchLayout(self.global_batch_seqs, self.micro_batch_seqs, self.gpus, self.seq_len)

    @property
    def tokens_per_step(self) -> int:
        return self.layout.tokens_per_step

    def steps_for(self, tokens: float) -> int:
        return self.layout.steps_for(tokens)


def batch_plan(cbs: float, gpus: int, micro_batch_seqs: int, seq_len: int) -> BatchPlan:
    """Largest global batch <= CBS that is a multiple of gpus * micro_batch; at least one such multiple."""
    unit = gpus * micro_batch_seqs
    k = int(cbs // unit) if math.isfinite(cbs) else 0
    layout = BatchLayout.resolve(max(k, 1) * unit, seq_len, gpus, micro_batch_seqs)
    return BatchPlan(global_batch_seqs=layout.global_batch_seqs, micro_batch_seqs=layout.micro_batch_seqs,
                     gpus=gpus, grad_accum=layout.gradient_accumulation, seq_len=seq_len, above_cbs=k < 1)


def describe_plan(plan: BatchPlan, cbs: Forecast, tokens: float) -> list[str]:
    lines = [f"batch plan: global batch {plan.global_batch_seqs} sequences = {plan.tokens_per_step:,} tokens "
             f"(seq_len {plan.seq_len}) = {plan.gpus} GPU(s) x micro-batch {plan.micro_batch_seqs} x "
             f"gradient accumulation {plan.grad_accum}; {plan.steps_for(tokens):,} steps to train the whole budget "
             f"of {tokens:.4g} tokens"]
    if plan.above_cbs:
        lines.append(f"warning: one micro-batch on every GPU ({plan.gpus * plan.micro_batch_seqs} sequences) "
                     f"already exceeds the CBS {_fmt(cbs.cbs)}; use fewer GPUs or a smaller micro-batch")
    elif math.isfinite(cbs.low) and plan.global_batch_seqs > cbs.low:
        lines.append(f"note: a global batch <= {_fmt(cbs.low)} sequences stays below the CBS's lower "
                     f"{cbs.level:.0%} prediction bound")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# time plan


@dataclass(frozen=True)
class TimePlan:
    fastest: TimeToTarget
    at_cbs_plan: TimeToTarget | None
    s_min: float
    b_noise: float
    budget: int
    """GPUs available (--gpus)."""
    beyond_cbs: bool
    """The search went past the CBS (--beyond-cbs); otherwise it stopped at max(CBS, the batch plan)."""
    model_params: int | None
    scaled_from: int | None
    """The measured model size whose throughput was scaled to model_params (N_measured / N), or None."""
    faster_above: TimeToTarget | None = None
    """Without beyond_cbs: the fastest row above the CBS, when it beats `fastest` on wall-clock time."""


def time_plan(sf: ScalingFile, choice: Choice, model_params: float | None, throughput: ThroughputModel,
              plan: BatchPlan, cbs: float, beyond_cbs: bool = False) -> TimePlan | str:
    """The batch and GPU count (<= plan.gpus) that reach the target fastest, or why there is none. The batches
    tried stop at the CBS (or the batch plan, when one micro-batch per GPU is already above it): past the CBS
    each doubling of the batch buys less than half the steps, so it is faster only by spending GPU-hours;
    `beyond_cbs` searches up to 16 x CBS all the same."""
    s_law, b_law = sf.s_min.get(choice.key), sf.b_noise.get(choice.key)
    if s_law is None or b_law is None or not (s_law.identifiable and b_law.identifiable):
        return "no time plan: scaling.json has no S_min and B_noise laws (re-run `cbs fit` to add them)"
    if not throughput:
        return ("no time plan: no throughput in scaling.json (the runs logged no perf/tokens_per_s); give "
                "--throughput CSV")
    n_models = {p.model_params for p in throughput.points} - {None}
    if model_params is None and len(n_models) > 1:
        return "no time plan: the throughput covers several model sizes; give --model-params"
    n = int(model_params) if model_params else (n_models.pop() if n_models else None)
    x = choice.x[0] if len(choice.x) == 1 else choice.x
    s_min, b_noise = float(s_law.predict(x)[0]), float(b_law.predict(x)[0])
    cap = max(cbs, plan.global_batch_seqs)
    rows = plan_rows("forecast", s_min, b_noise, n, throughput, plan.seq_len, plan.gpus, plan.micro_batch_seqs,
                     max(16 * cbs, 16 * plan.gpus * plan.micro_batch_seqs))
    below = [r for r in rows if r.batch_size <= cap]
    b = plan.global_batch_seqs  # a multiple of plan.gpus (batch_plan): every GPU has whole sequences
    at_plan = time_row("forecast", n, b, s_min * (1 + b_noise / b), plan.gpus, throughput, plan.seq_len)
    below += [at_plan] if at_plan is not None else []  # the plan's batch is no power of 2 in general
    if not below:
        return "no time plan: no batch fits the GPU budget"
    best, above = fastest(below + (rows if beyond_cbs else [])), fastest([r for r in rows if r.batch_size > cap])
    faster_above = above if not beyond_cbs and above is not None and above.hours < best.hours else None
    return TimePlan(best, at_plan, s_min, b_noise, plan.gpus, beyond_cbs, n, throughput.scaled_from(n), faster_above)


def _throughput_text(tp: TimePlan, row: TimeToTarget) -> str:
    """Where a row's tokens/s comes from: measured there, or modelled (docs/method.md, "Time and cost")."""
    if row.measured:
        return f"throughput measured: {row.tokens_per_s:,.0f} tokens/s"
    text = f"throughput modelled: {row.tokens_per_s:,.0f} tokens/s (data parallel from the measured local batches"
    if tp.scaled_from is not None and tp.model_params:
        text += (f"; scaled with N from the N = {tp.scaled_from:.3g} measured by N_measured / N = "
                 f"{tp.scaled_from / tp.model_params:.3g}, assuming the same FLOP/s per GPU")
    return text + ")"


def describe_time_plan(tp: TimePlan | str, micro_batch: int) -> list[str]:
    if isinstance(tp, str):
        return [tp]
    f = tp.fastest
    where = "any batch up to 16 x the CBS (--beyond-cbs)" if tp.beyond_cbs else "a batch <= the CBS"
    lines = [f"fastest to the target with <= {tp.budget} GPU(s) at {where}: "
             f"global batch {f.batch_size} on {f.gpus} GPU(s) (micro-batch {micro_batch} x accumulation "
             f"{gradient_accumulation(f.batch_size, micro_batch, f.gpus)}): {f.steps:,.0f} steps to the target loss (S(B) = "
             f"{tp.s_min:.4g} (1 + {tp.b_noise:.4g}/B)), {hours_text(f.hours)} wall-clock, {f.gpu_hours:,.3g} "
             f"GPU-hours; {_throughput_text(tp, f)}"]
    if tp.at_cbs_plan is not None:
        c = tp.at_cbs_plan
        lines.append(f"the batch plan (global batch {c.batch_size}): {c.steps:,.0f} steps to the target loss, "
                     f"{hours_text(c.hours)} wall-clock, {c.gpu_hours:,.3g} GPU-hours; {_throughput_text(tp, c)}")
    if tp.faster_above is not None:
        a = tp.faster_above
        lines.append(f"note: above the CBS, global batch {a.batch_size} on {a.gpus} GPU(s) gets there in "
                     f"{hours_text(a.hours)} ({a.gpu_hours:,.3g} GPU-hours), training on more tokens than the data "
                     f"budget needs at the CBS; --beyond-cbs plans with such batches")
    return lines
