"""How a global batch splits over ranks and micro-batches: the one home of that arithmetic (stdlib only).

A training step of a global batch of B sequences runs on P data-parallel ranks; each rank does k forward/backward
passes (gradient accumulation) of m sequences (the micro-batch), so that B = m x P x k exactly. A step trains
B x T tokens (T the sequence length). `BatchLayout.resolve` fixes m, P and k once per world size and refuses
any B that does not split, naming the key and the fix; pretrain, the study planner and the forecast all use it,
so a study refuses at plan time exactly what a run would refuse at start.

The micro-batch: `micro_batch_seqs` when given, else DEFAULT_MICRO_BATCH_SEQS; a batch smaller than it trains as
one micro-batch of itself (m = min(micro, B)), so a sweep from small to large batches can share one setting.
The rule does not depend on P, so a config's micro-batch is known without knowing where it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DEFAULT_MICRO_BATCH_SEQS = 8
"""Sequences per forward/backward pass on each rank when a config does not say."""


class BatchError(ValueError):
    """A batch that does not split into micro-batches on every rank; the message names the key and the fix."""


def steps_for(tokens: int, tokens_per_step: int) -> int:
    """The first step that has seen at least `tokens` tokens: ceil(tokens / tokens_per_step)."""
    return -(-tokens // tokens_per_step)


def micro_batch_for(global_batch_seqs: int, micro_batch_seqs: Optional[int] = None) -> int:
    """The micro-batch of a run whose (first) global batch is `global_batch_seqs`: the given micro-batch (or
    DEFAULT_MICRO_BATCH_SEQS), at most the batch itself."""
    return min(micro_batch_seqs or DEFAULT_MICRO_BATCH_SEQS, global_batch_seqs)


def gradient_accumulation(global_batch_seqs: int, micro_batch_seqs: int, data_parallel: int,
                          key: str = "global_batch_seqs") -> int:
    """k in B = m x P x k, exactly; BatchError naming `key` for anything else (before a run starts)."""
    per_step = micro_batch_seqs * data_parallel
    if global_batch_seqs < 1 or global_batch_seqs % per_step:
        raise BatchError(
            f"{key} ({global_batch_seqs}) must be divisible by micro_batch_seqs ({micro_batch_seqs}) x "
            f"data-parallel size ({data_parallel}) = {per_step}; change one of the three")
    return global_batch_seqs // per_step


def splits(global_batch_seqs: int, micro_batch_seqs: int, data_parallel: int) -> bool:
    """Whether a global batch splits into whole micro-batches of `micro_batch_seqs` on `data_parallel` ranks."""
    return global_batch_seqs >= 1 and global_batch_seqs % (micro_batch_seqs * data_parallel) == 0


@dataclass(frozen=True)
class BatchLayout:
    """One global batch on a given number of data-parallel ranks: B = micro x ranks x accumulation."""

    global_batch_seqs: int
    """B: sequences per optimizer step, over all ranks."""
    micro_batch_seqs: int
    """m: sequences per forward/backward pass on each rank."""
    data_parallel: int
    """P: data-parallel ranks (world size; no tensor or pipeline parallelism)."""
    seq_len: int
    """T: tokens per sequence."""

    @classmethod
    def resolve(cls, global_batch_seqs: int, seq_len: int, data_parallel: int = 1,
                micro_batch_seqs: Optional[int] = None, key: str = "global_batch_seqs") -> "BatchLayout":
        """The layout of a run, its micro-batch from `micro_batch_for`; BatchError naming `key` if B does not
        split."""
        if data_parallel < 1:
            raise BatchError(f"data-parallel size must be >= 1: got {data_parallel}")
        if seq_len < 1:
            raise BatchError(f"seq_len must be >= 1: got {seq_len}")
        micro = micro_batch_for(global_batch_seqs, micro_batch_seqs)
        gradient_accumulation(global_batch_seqs, micro, data_parallel, key)
        return cls(global_batch_seqs, micro, data_parallel, seq_len)

    def at(self, global_batch_seqs: int, key: str = "global_batch_seqs") -> "BatchLayout":
        """The same micro-batch and ranks at another global batch (a later stage of a batch ramp); BatchError
        naming `key` if it does not split."""
        gradient_accumulation(global_batch_seqs, self.micro_batch_seqs, self.data_parallel, key)
        return BatchLayout(global_batch_seqs, self.micro_batch_seqs, self.data_parallel, self.seq_len)

    @property
    def gradient_accumulation(self) -> int:
        """k = B / (m x P): micro-batches per rank per step."""
        return self.global_batch_seqs // (self.micro_batch_seqs * self.data_parallel)

    @property
    def tokens_per_step(self) -> int:
        """B x T."""
        return self.global_batch_seqs * self.seq_len

    def steps_for(self, tokens: float) -> int:
        """The first step that has seen at least `tokens` tokens."""
        return int(-(-tokens // self.tokens_per_step))
