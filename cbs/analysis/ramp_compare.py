"""A batch ramp against fixed batches at one target loss: optimizer steps, tokens and training wall-clock to the
target, and the saving the plan predicted against the saving measured (docs/method.md, "Batch ramp").

Input: DIR/runs/*/ as pretrain writes them (config.yaml, result.json, metrics.jsonl); a run whose config has a
`batch_schedule` is a ramp, the others are fixed batches. Every run tracks the target (the first target loss the
runs share, or `target`).

Per run, with the crossing of the target by the EWA weights (the first EWA tau to cross; `raw` for raw weights):

- steps and tokens to the target: `step_interp` and `tokens_interp` of result.json (the eval curve interpolated
  in log-loss to the target); None when the run never reached it;
- wall-clock to the target: training seconds up to those tokens from the logged throughput, sum over log windows
  of (tokens in the window) / perf/tokens_per_s, the window of the crossing pro rata (evaluation time excluded:
  it depends on the eval grid, not on the batch).

Against the fixed run at the ramp's first batch b0 (D0 its tokens to the target, T tokens per sequence):

    predicted saving = 1 - steps_ramp(D0) / (D0 / (b0 T))    the ramp's own schedule over D0 tokens: what it saves
                                                             if its loss matches the fixed run token for token
    measured saving  = 1 - (ramp steps to target) / (fixed-b0 steps to target)

Measured below predicted means the ramp lost loss per token (a stage above the local CBS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from cbs.analysis import InputError
from cbs.analysis.batch_schedule import BatchSchedule, Stage
from cbs.analysis.steps import read_json, read_yaml
from cbs.runfiles import (CONFIG, EVAL_LOSS, EVAL_LOSS_EWA_PREFIX, METRICS, RESULT, RESUMABLE, RUNS, TOKENS_PER_S,
                          metrics_records)

RAMP_COLUMNS = ["run", "kind", "batches", "target_loss", "steps", "tokens", "seconds", "reached",
                "steps_saved_vs_first", "predicted_steps_saved"]


@dataclass
class RampRun:
    name: str
    schedule: BatchSchedule
    ramp: bool
    target: float
    steps: float | None
    tokens: float | None
    seconds: float | None
    curve: list[tuple[int, int, float]] = field(default_factory=list)
    """(step, tokens, eval loss of the weights read) of every eval."""
    seed: int | None = None

    @property
    def batches(self) -> str:
        return "->".join(str(s.batch) for s in self.schedule.stages)


@dataclass
class RampComparison:
    runs: list[RampRun]
    target: float
    weights: str
    first: RampRun | None
    """The fixed run at the ramp's first batch (None when absent)."""

    def first_of(self, run: RampRun) -> RampRun | None:
        """The fixed run at the first batch with `run`'s seed (a study with several seeds pairs them)."""
        b0 = self.first.schedule.first_batch if self.first else None
        same = [r for r in self.runs if not r.ramp and r.schedule.first_batch == b0 and r.seed == run.seed
                and len(r.schedule.stages) == 1]
        return same[0] if same else self.first

    def saving(self, run: RampRun) -> tuple[float | None, float | None]:
        """(measured, predicted) steps saved by `run` against the fixed run at the first batch (same seed)."""
        f = self.first_of(run)
        if f is None or f.steps is None or f.tokens is None:
            return None, None
        measured = None if run.steps is None else 1 - run.steps / f.steps
        b0_steps = f.tokens / (f.schedule.first_batch * f.schedule.seq_len)
        return measured, 1 - run.schedule.steps_for(f.tokens) / b0_steps


def is_ramp_dir(path: Path) -> bool:
    """A directory whose runs/ holds a run trained with a batch schedule."""
    runs = path / RUNS
    return runs.is_dir() and any((r / CONFIG).is_file() and
                                 (read_yaml(r / CONFIG).get("batch_schedule") is not None)
                                 for r in runs.iterdir() if r.is_dir())


def _schedule(config: dict, where: Path) -> BatchSchedule:
    seq_len = (config.get("model") or {}).get("seq_len")
    stages = (config.get("resolved") or {}).get("batch_stages")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise InputError(f"{where}: model.seq_len must be a positive integer")
    if config.get("batch_schedule") is not None:
        if not isinstance(stages, list) or not stages:
            raise InputError(f"{where}: a ramp run without resolved.batch_stages (written by pretrain); rerun it")
        return BatchSchedule([Stage(int(s["batch"]), s.get("until_tokens")) for s in stages], seq_len)
    batch = config.get("global_batch_seqs")
    if not isinstance(batch, int) or batch < 1:
        raise InputError(f"{where}: global_batch_seqs must be a positive integer (or a batch_schedule)")
    return BatchSchedule.fixed(batch, seq_len)


def _crossing(result: dict, target: float, weights: str) -> dict | None:
    for t in result.get("targets") or []:
        if math.isclose(float(t.get("loss", math.nan)), target, rel_tol=1e-9):
            if weights == "raw":
                return t.get("raw")
            ewa = [c for c in (t.get("ewa") or {}).values() if c]
            return min(ewa, key=lambda c: c.get("step_interp", c["step"]), default=None)
    raise InputError(f"result.json has no target {target}: the runs were trained for other targets")


def _metrics(path: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, values as written; [] without one."""
    return list(metrics_records(path)) if path.is_file() else []


def seconds_to(tokens: float, lines: list[dict], trained: float | None = None) -> float | None:
    """Training seconds to `tokens` from the throughput of each log window (module docstring). Past the last
    log line (a run that stopped at the target between logs) the last window's throughput is carried on, up to
    the tokens the run trained (`trained`); None beyond them."""
    total, prev, speed = 0.0, 0, None
    for m in lines:
        speed_now = m.get(TOKENS_PER_S)
        if not isinstance(speed_now, (int, float)) or speed_now <= 0:
            continue
        speed = speed_now
        if m["tokens"] >= tokens:
            return total + (tokens - prev) / speed
        total, prev = total + (m["tokens"] - prev) / speed, m["tokens"]
    if speed is not None and trained is not None and tokens <= trained:
        return total + (tokens - prev) / speed
    return None


def _curve(lines: list[dict], weights: str) -> list[tuple[int, int, float]]:
    out = []
    for m in lines:
        keys = [EVAL_LOSS] if weights == "raw" else [k for k in m if k.startswith(EVAL_LOSS_EWA_PREFIX)]
        values = [float(m[k]) for k in keys if k in m and isinstance(m[k], (int, float))]
        if values:
            out.append((m["step"], m["tokens"], min(values)))
    return out


def finished_runs(runs_dir: Path) -> list[Path]:
    """The run directories with a config.yaml and a result.json whose status is not RESUMABLE: a preempted run
    is unfinished (as in a sweep's fit), not a run that never reached the target."""
    return sorted(r for r in runs_dir.iterdir() if (r / RESULT).is_file() and (r / CONFIG).is_file()
                  and read_json(r / RESULT).get("status") not in RESUMABLE)


def read_ramp_runs(path: Path, target: float | None = None, weights: str = "ewa") -> RampComparison:
    runs_dir = Path(path) / RUNS
    found = finished_runs(runs_dir)
    if not found:
        raise InputError(f"{runs_dir}: no finished run (config.yaml and result.json)")
    configs = {r: read_yaml(r / CONFIG) for r in found}
    if target is None:
        shared = set.intersection(*(set(c.get("targets") or []) for c in configs.values()))
        if not shared:
            raise InputError(f"{runs_dir}: the runs share no target loss; train them with the same `targets`")
        target = max(shared)  # the first one reached
    runs = []
    for r in found:
        result, lines = read_json(r / RESULT), _metrics(r / METRICS)
        trained = result.get("tokens") if isinstance(result.get("tokens"), (int, float)) else None
        crossing = _crossing(result, target, weights)
        steps = crossing.get("step_interp", crossing["step"]) if crossing else None
        tokens = crossing.get("tokens_interp", crossing["tokens"]) if crossing else None
        runs.append(RampRun(r.name, _schedule(configs[r], r / CONFIG),
                            configs[r].get("batch_schedule") is not None, target, steps, tokens,
                            seconds_to(tokens, lines, trained) if tokens is not None else None,
                            _curve(lines, weights), configs[r].get("seed")))
    ramps = [r for r in runs if r.ramp]
    if not ramps:
        raise InputError(f"{runs_dir}: no run with a batch_schedule to compare")
    b0 = ramps[0].schedule.first_batch
    first = next((r for r in runs if not r.ramp and r.schedule.first_batch == b0), None)
    return RampComparison(runs, target, weights, first)


def read_ramp_targets(path: Path, weights: str = "ewa") -> list[RampComparison]:
    """One comparison per target loss the runs share (one per setting of a study), the highest (first reached)
    first."""
    runs_dir = Path(path) / RUNS
    configs = [read_yaml(r / CONFIG) for r in finished_runs(runs_dir)]
    shared = set.intersection(*(set(c.get("targets") or []) for c in configs)) if configs else set()
    if not shared:
        raise InputError(f"{runs_dir}: the runs share no target loss; train them with the same `targets`")
    return [read_ramp_runs(path, t, weights) for t in sorted(shared, reverse=True)]


def ramp_rows(cmp: RampComparison) -> list[list]:
    rows = []
    for r in cmp.runs:
        measured, predicted = cmp.saving(r)
        rows.append([r.name, "ramp" if r.ramp else "fixed", r.batches, cmp.target, r.steps, r.tokens,
                     None if r.seconds is None else round(r.seconds, 3), int(r.steps is not None),
                     None if measured is None else round(measured, 6),
                     None if predicted is None or not r.ramp else round(predicted, 6)])
    return rows


def ramp_report(cmp: RampComparison) -> list[str]:
    lines = [f"# Batch ramp against fixed batches: target loss {cmp.target:g} ({cmp.weights} weights)", "",
             "| run | batches | steps to target | tokens to target | seconds to target | steps saved vs first "
             "(measured / predicted) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in cmp.runs:
        measured, predicted = cmp.saving(r)
        saved = ("not reached" if measured is None else f"{100 * measured:.1f}%") + (
            f" / {100 * predicted:.1f}%" if r.ramp and predicted is not None else "")
        saved = "" if predicted is None else saved
        lines.append(f"| {r.name} | {r.batches} | {_num(r.steps)} | {_num(r.tokens)} | "
                     f"{_num(r.seconds, 1)} | {saved} |")
    savings = [m for m in (cmp.saving(r)[0] for r in cmp.runs if r.ramp) if m is not None]
    if len(savings) > 1:  # several seeds: the spread of the measured saving, and a t interval of its mean
        low, high = seed_interval(savings)
        lines += ["", f"Measured steps saved over {len(savings)} seeds: mean {100 * sum(savings) / len(savings):.1f}%, "
                      f"range {100 * min(savings):.1f}% to {100 * max(savings):.1f}%, 95% interval of the mean "
                      f"{100 * low:.1f}% to {100 * high:.1f}%."]
    return lines + [""]


def seed_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of per-seed values: mean -+ t_{n-1, (1+level)/2} s / sqrt(n), s the sample
    standard deviation (seeds as independent draws of the whole training run; needs n >= 2)."""
    from scipy.stats import t

    n = len(values)
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    half = t.ppf((1 + level) / 2, n - 1) * sd / n ** 0.5
    return mean - half, mean + half


RAMP_NOTES = ["Steps and tokens to the target are interpolated on each run's eval curve; seconds are training time "
              "from the logged throughput (evaluations excluded). Predicted: the ramp's schedule over the tokens "
              "the fixed run at its first batch needed (the saving if its loss per token matched); measured below "
              "predicted means some stage ran above the local CBS.", "",
              "![loss against steps and tokens](figures/ramp_loss.png)"]


def ramp_report_md(comparisons: list[RampComparison]) -> str:
    """report.md: a table per target, then the notes and the figure."""
    return "\n".join([line for cmp in comparisons for line in ramp_report(cmp)] + RAMP_NOTES) + "\n"


def _num(x: float | None, digits: int = 0) -> str:
    return "not reached" if x is None else f"{x:,.{digits}f}"


def figure_ramp(cmp: RampComparison, targets: list[float] | None = None) -> bytes:
    """Eval loss against optimizer steps and against tokens, ramp and fixed runs, with the target(s)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cbs.analysis.figures import png_bytes

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for r in cmp.runs:
        if not r.curve:
            continue
        steps, tokens, loss = zip(*r.curve)
        style = "-" if r.ramp else "--"
        for ax, x in zip(axes, (steps, tokens)):
            ax.plot(x, loss, style, marker=".", label=f"{'ramp' if r.ramp else 'fixed'} {r.batches}")
    for ax, name in zip(axes, ("optimizer steps", "tokens")):
        for target in targets or [cmp.target]:
            ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(f"eval loss ({cmp.weights})")
    if any(r.curve for r in cmp.runs):
        axes[0].legend(fontsize=8)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.95, wspace=0.25)
    return png_bytes(fig)
