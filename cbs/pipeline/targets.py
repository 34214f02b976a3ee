"""Target losses and their crossings: the first eval at which each kind of weights reached each target.

Torch-free, so that the study can (re)compute crossings from a run's logged eval curve. A crossing records the
eval step where loss <= target first held, its tokens, and `step_interp`: the step interpolated linearly in
log-loss between that eval and the previous one (docs/method.md, "Steps to target").

Crossings are keyed by the target's value, never by its position: a run resumed or re-read with other targets
recomputes the new ones from its eval curve (`replay`) instead of inheriting another target's crossing.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

from cbs.runfiles import EVAL_LOSS

RAW = "raw"


def eval_key(kind: str) -> str:
    """The metrics key of a weights kind: `raw` -> eval/loss, `ewa/0.99` -> eval/loss_ewa/0.99."""
    return EVAL_LOSS if kind == RAW else f"{EVAL_LOSS}_{kind}"


def weight_kinds(taus: Iterable[float]) -> list[str]:
    """`raw` and one `ewa/<tau>` per EWA decay: the weights every eval measures."""
    return [RAW] + [f"ewa/{tau}" for tau in taus]


def as_loss(value) -> float:
    """A logged loss as a float: metrics.jsonl writes non-finite values as the strings "nan", "inf", "-inf",
    which float() reads as well as numbers (read_metrics converts them already; a record made by hand may not)."""
    return float(value)


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


class TargetTracker:
    """First crossing of each target loss by each kind of weights (`raw`, `ewa/<tau>`)."""

    def __init__(self, targets: list[float], kinds: list[str]):
        self.targets = [float(t) for t in targets]
        self.kinds = list(kinds)
        self.crossings: dict[str, list[Optional[dict]]] = {k: [None] * len(self.targets) for k in self.kinds}
        self.previous: dict[str, tuple[int, float]] = {}

    def update(self, step: int, tokens: int, losses: dict[str, float]) -> None:
        """The eval losses after `step` steps, which saw `tokens` tokens. A crossing between two evals is
        interpolated in log-loss, by the same fraction in steps and in tokens (a batch ramp's tokens are not
        proportional to its steps)."""
        for kind, loss in losses.items():
            if kind not in self.crossings:
                continue
            loss = as_loss(loss)
            prev = self.previous.get(kind)
            for i, target in enumerate(self.targets):
                if self.crossings[kind][i] is not None or not (loss <= target):
                    continue
                interp, interp_tokens = float(step), float(tokens)
                if prev is not None and prev[1] > target and loss > 0:
                    frac = (math.log(prev[1]) - math.log(target)) / (math.log(prev[1]) - math.log(loss))
                    prev_tokens = prev[2] if len(prev) > 2 else prev[0] * tokens / step  # saved before tokens were
                    interp = prev[0] + frac * (step - prev[0])
                    interp_tokens = prev_tokens + frac * (tokens - prev_tokens)
                self.crossings[kind][i] = {"step": step, "tokens": tokens, "step_interp": round(interp, 4),
                                           "tokens_interp": round(interp_tokens, 1)}
            if math.isfinite(loss):
                self.previous[kind] = (step, loss, tokens)

    def replay(self, eval_records: Iterable[dict], tokens_per_step: Optional[int] = None,
               until_step: Optional[int] = None) -> None:
        """Feed logged eval events (metrics.jsonl lines with `eval/loss...` keys), in step order. Each record's
        tokens are its `tokens` (every metrics.jsonl line has them), else step x tokens_per_step."""
        for record in eval_records:
            if until_step is not None and record["step"] > until_step:
                break
            tokens = record["tokens"] if "tokens" in record else record["step"] * tokens_per_step
            self.update(record["step"], tokens, {k: record[eval_key(k)] for k in self.kinds if eval_key(k) in record})

    def all_reached(self, weights: str = "any") -> bool:
        """Every target reached by some kind of weights: any kind, `raw`, or `ewa` (any EWA tau)."""
        kinds = [k for k in self.kinds if weights == "any" or k == weights or k.startswith(f"{weights}/")]
        return all(any(self.crossings[k][i] is not None for k in kinds) for i in range(len(self.targets)))

    def to_json(self) -> list[dict]:
        """result.json's `targets`: per target, the raw crossing and one per EWA decay (null: not reached)."""
        out = []
        for i, target in enumerate(self.targets):
            entry = {"loss": target, "raw": self.crossings.get(RAW, [None] * len(self.targets))[i], "ewa": {}}
            for kind in self.kinds:
                if kind.startswith("ewa/"):
                    entry["ewa"][kind[4:]] = self.crossings[kind][i]
            out.append(entry)
        return out

    def state_dict(self) -> dict:
        return {"targets": self.targets, "crossings": self.crossings, "previous": self.previous}

    def load_state_dict(self, state: dict) -> list[float]:
        """Restore the crossings of the targets this tracker shares with `state` (matched by value).

        Returns the targets it could not restore (new ones, or every one of a state without target values):
        recompute those with `replay` over the run's eval curve up to the checkpoint's step.
        """
        saved = [float(t) for t in state.get("targets", [])]
        missing = []
        for i, target in enumerate(self.targets):
            j = next((j for j, s in enumerate(saved) if _same(s, target)), None)
            if j is None:
                missing.append(target)
                continue
            for kind in self.kinds:
                if kind in state["crossings"]:
                    self.crossings[kind][i] = state["crossings"][kind][j]
        self.previous = {k: tuple(v) for k, v in state.get("previous", {}).items() if k in self.crossings}
        return missing


def targets_reached(result: dict) -> tuple[int, int]:
    """(targets reached by some weights, targets) of a result.json."""
    targets = result.get("targets") or []
    return sum(1 for t in targets if t.get("raw") or any((t.get("ewa") or {}).values())), len(targets)


def crossings_match(result: dict, targets: list[float]) -> bool:
    """True when a result.json's crossings were computed for exactly these target losses (in any order)."""
    have = sorted(float(t["loss"]) for t in result.get("targets") or [])
    want = sorted(float(t) for t in targets)
    return len(have) == len(want) and all(_same(a, b) for a, b in zip(have, want))
