"""The paper's near-optimal per-batch hyper-parameters (Zhang et al. 2025; docs/method.md), B in sequences."""

from __future__ import annotations

import math

# Batches between or beyond the table take the nearest entry in log space.
# take the nearest entry in log space.
PAPER_BETA2 = {64: .999, 128: .999, 256: .995, 512: .99, 1024: .99, 2048: .95, 4096: .95, 8192: .95, 16384: .95}
PAPER_TAU = {64: .9995, 128: .9995, 256: .9995, 512: .9995, 1024: .999, 2048: .998, 4096: .995, 8192: .99,
             16384: .99}


def paper_value(table: dict[int, float], batch: int) -> float:
    """The table's value at the entry nearest to `batch` in log space."""
    return table[min(table, key=lambda b: abs(math.log(b) - math.log(batch)))]
