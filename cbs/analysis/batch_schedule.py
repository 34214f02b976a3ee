"""A global batch that grows with the tokens seen: its stages, its arithmetic and its file, in one place.

`cbs forecast --ramp --out FILE` writes the file, `pretrain.batch_schedule` reads it, and both count steps with
the same `BatchSchedule`, so the steps a plan predicts are the steps a run takes. Pure Python (no torch): the
analysis side uses it, and pipeline imports it from here (pipeline may import analysis, never the reverse).

A schedule is a list of stages (b_i sequences, until_tokens u_i), u_i strictly increasing, b_i never decreasing;
the last stage has no end (it runs to the budget). Step s (0-based) trains at b_i for the first stage whose u_i
exceeds the tokens seen before s. A step is never split, so stage i starts where stage i - 1's steps ended,
at t_i >= u_{i-1} tokens, and takes

    n_i = max(0, ceil((u_i - t_i) / (b_i T)))        t_{i+1} = t_i + n_i b_i T        (T tokens per sequence)

steps. A fixed batch B is the one-stage schedule [(B, -)]: n steps see n B T tokens, as before. Token counts
are whole numbers, so a boundary u (e.g. a planned 141.42) acts as ceil(u): tokens < u <=> tokens < ceil(u).

The file (YAML):

    format: cbs-batch-schedule/1
    stages:                       # what pretrain reads
    - {batch: 8, until_tokens: 20000}
    - {batch: 16}                 # the last stage runs to the budget
    planned: {...}                # what the plan predicted (tokens, steps, fixed batch, saving); for people
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import yaml

from cbs.analysis import InputError

FORMAT = "cbs-batch-schedule/1"


class ScheduleError(InputError):
    """A schedule that cannot be trained; `key` is where (e.g. `stages[1].batch`), the message says the fix."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Stage:
    batch: int
    """Global batch in sequences."""
    until_tokens: Optional[int] = None
    """The stage trains while fewer tokens than this were seen; None: to the end (the last stage only)."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class BatchSchedule:
    """Step <-> batch <-> tokens of a list of stages (the module docstring's arithmetic)."""

    def __init__(self, stages: Iterable[Stage], seq_len: int):
        self.stages = tuple(stages)
        self.seq_len = seq_len
        self.start_steps, self.start_seqs = [0], [0]  # of each stage
        for s in self.stages[:-1]:
            n = max(0, _ceil_div(math.ceil(s.until_tokens) - self.start_seqs[-1] * seq_len, s.batch * seq_len))
            self.start_steps.append(self.start_steps[-1] + n)
            self.start_seqs.append(self.start_seqs[-1] + n * s.batch)

    @classmethod
    def fixed(cls, batch: int, seq_len: int) -> "BatchSchedule":
        return cls([Stage(batch)], seq_len)

    @property
    def first_batch(self) -> int:
        return self.stages[0].batch

    @property
    def max_batch(self) -> int:
        return self.stages[-1].batch

    def stage_of(self, step: int) -> int:
        """Index of the stage that trains step `step` (0-based); empty stages (n_i = 0) are skipped."""
        return bisect.bisect_right(self.start_steps, step) - 1

    def batch_at(self, step: int) -> int:
        return self.stages[self.stage_of(step)].batch

    def seqs_before(self, step: int) -> int:
        """Sequences seen before step `step` (0-based), i.e. after `step` steps: the data position."""
        i = self.stage_of(step)
        return self.start_seqs[i] + (step - self.start_steps[i]) * self.stages[i].batch

    def tokens_before(self, step: int) -> int:
        """Tokens seen after `step` steps."""
        return self.seqs_before(step) * self.seq_len

    def steps_for(self, tokens: float) -> int:
        """The first step count that has seen at least `tokens` tokens (0 for tokens <= 0)."""
        for i, s in enumerate(self.stages):
            last = i + 1 == len(self.stages)
            if last or tokens <= self.start_seqs[i + 1] * self.seq_len:
                seqs_in = math.ceil(tokens / self.seq_len) - self.start_seqs[i]
                return self.start_steps[i] + max(0, _ceil_div(seqs_in, s.batch))
        raise AssertionError("unreachable")

    def total_steps(self, train_tokens: int) -> int:
        return self.steps_for(train_tokens)

    def stage_steps(self, train_tokens: int) -> list[int]:
        """Steps each stage trains within a budget of train_tokens (a stage past the budget trains 0)."""
        total = self.total_steps(train_tokens)
        ends = self.start_steps[1:] + [total]
        return [max(0, min(e, total) - min(s, total)) for s, e in zip(self.start_steps, ends)]


# ----------------------------------------------------------------------------------------------------------------
# stages from data, checked


def _positive_int(value, key: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ScheduleError(key, f"{key} must be a whole number >= 1: got {value!r}")
    return value


def parse_stages(data, train_tokens: Optional[int] = None) -> list[Stage]:
    """A list of {batch, until_tokens} mappings -> stages, checked: batches never decrease, boundaries strictly
    increase and lie inside the budget (when given), every stage but the last has a boundary."""
    if not isinstance(data, list) or not data:
        raise ScheduleError("stages", f"stages must be a non-empty list of {{batch, until_tokens}}: got {data!r}")
    stages = []
    for i, item in enumerate(data):
        key = f"stages[{i}]"
        if not isinstance(item, dict) or set(item) - {"batch", "until_tokens"} or "batch" not in item:
            raise ScheduleError(key, f"{key} must be a mapping {{batch: B, until_tokens: T}}: got {item!r}")
        until = item.get("until_tokens")
        stages.append(Stage(_positive_int(item["batch"], f"{key}.batch"),
                            None if until is None else _positive_int(until, f"{key}.until_tokens")))
    for i, (a, b) in enumerate(zip(stages, stages[1:]), start=1):
        if b.batch < a.batch:
            raise ScheduleError(f"stages[{i}].batch", f"stages[{i}].batch ({b.batch}) is below stages[{i - 1}].batch "
                                f"({a.batch}): a batch schedule never decreases")
        if a.until_tokens is None:
            raise ScheduleError(f"stages[{i - 1}].until_tokens", f"stages[{i - 1}].until_tokens is required: only "
                                "the last stage runs to the end of the budget")
        if b.until_tokens is not None and b.until_tokens <= a.until_tokens:
            raise ScheduleError(f"stages[{i}].until_tokens", f"stages[{i}].until_tokens ({b.until_tokens}) must "
                                f"be above stages[{i - 1}].until_tokens ({a.until_tokens})")
    if train_tokens is not None:
        for i, s in enumerate(stages):
            last = i + 1 == len(stages)
            if s.until_tokens is not None and (s.until_tokens > train_tokens if last else
                                               s.until_tokens >= train_tokens):
                raise ScheduleError(f"stages[{i}].until_tokens", f"stages[{i}].until_tokens ({s.until_tokens}) is "
                                    f"beyond the budget train_tokens ({train_tokens}): the stages after it would never "
                                    "train; lower it or raise train_tokens")
    return stages


def stages_to_data(stages: Iterable[Stage]) -> list[dict]:
    return [{"batch": s.batch} if s.until_tokens is None else {"batch": s.batch, "until_tokens": s.until_tokens}
            for s in stages]


# ----------------------------------------------------------------------------------------------------------------
# the file


def write_schedule_file(path: str | Path, stages: Iterable[Stage], planned: dict) -> None:
    """The module docstring's file; the last stage is written without an end (it runs to the budget)."""
    stages = list(stages)
    stages[-1] = Stage(stages[-1].batch)
    text = yaml.safe_dump({"format": FORMAT, "stages": stages_to_data(stages), "planned": planned},
                          sort_keys=False, default_flow_style=None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def read_schedule_file(path: str | Path) -> list[dict]:
    """The stages of a schedule file as data (parse_stages checks them)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ScheduleError("", f"cannot read the batch schedule file {path}: {e.strerror}; write it with "
                            "`cbs forecast --ramp ... --out FILE`") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ScheduleError("", f"{path} is not a YAML batch schedule file ({e}); write it with "
                            "`cbs forecast --ramp ... --out FILE`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "stages" not in data:
        raise ScheduleError("", f"{path} is not a batch schedule file (it needs `format: {FORMAT}` and `stages`); "
                            "write it with `cbs forecast --ramp ... --out FILE`")
    return data["stages"]
