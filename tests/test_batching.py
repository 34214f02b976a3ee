"""cbs/batching.py: how a global batch splits over ranks and micro-batches, the one rule pretrain, the study planner
and the forecast share."""

import subprocess
import sys
from pathlib import Path

import pytest

from cbs.batching import (DEFAULT_MICRO_BATCH_SEQS, BatchError, BatchLayout, gradient_accumulation, micro_batch_for,
                          splits, steps_for)

ROOT = Path(__file__).resolve().parent.parent


def test_layout_of_a_batch_on_ranks():
    layout = BatchLayout.resolve(256, seq_len=512, data_parallel=4, micro_batch_seqs=8)
    assert (layout.micro_batch_seqs, layout.gradient_accumulation, layout.tokens_per_step) == (8, 8, 256 * 512)
    assert layout.micro_batch_seqs * layout.data_parallel * layout.gradient_accumulation == 256
    assert layout.steps_for(256 * 512 * 10) == 10 and layout.steps_for(256 * 512 * 10 + 1) == 11
    with pytest.raises(AttributeError):  # frozen: resolved once, never edited
        layout.micro_batch_seqs = 4


def test_the_micro_batch_default_and_its_clamp():
    assert micro_batch_for(64) == DEFAULT_MICRO_BATCH_SEQS == 8
    assert micro_batch_for(4) == 4  # a batch smaller than the micro-batch is one micro-batch of itself
    assert micro_batch_for(4, 16) == 4 and micro_batch_for(64, 16) == 16
    # the clamp does not depend on the ranks: a config's micro-batch is known without knowing where it runs
    assert BatchLayout.resolve(4, 128, 1, 16).micro_batch_seqs == 4
    assert BatchLayout.resolve(64, 128, 2).micro_batch_seqs == 8


@pytest.mark.parametrize("batch, micro, ranks, product", [(100, 8, 2, 16), (12, 8, 1, 8), (4, 4, 2, 8), (3, 1, 2, 2)])
def test_a_batch_that_does_not_split_is_refused_naming_key_and_fix(batch, micro, ranks, product):
    assert not splits(batch, micro, ranks)
    with pytest.raises(BatchError, match=rf"stages\[1\]\.batch \({batch}\) must be divisible by micro_batch_seqs "
                                         rf"\({micro}\) x data-parallel size \({ranks}\) = {product}; change one"):
        BatchLayout.resolve(batch, 128, ranks, micro, key="stages[1].batch")
    with pytest.raises(BatchError, match=rf"global_batch_seqs \({batch}\)"):
        gradient_accumulation(batch, micro, ranks)


def test_a_later_stage_keeps_micro_batch_and_ranks():
    first = BatchLayout.resolve(8, 64, 2, 4)
    later = first.at(32)
    assert (later.micro_batch_seqs, later.data_parallel, later.gradient_accumulation, later.tokens_per_step) == \
        (4, 2, 4, 32 * 64)
    with pytest.raises(BatchError, match=r"ladder\[2\] \(36\) must be divisible by micro_batch_seqs \(4\) x "
                                         r"data-parallel size \(2\) = 8"):
        first.at(36, "ladder[2]")


def test_steps_for_is_the_first_step_that_has_seen_the_tokens():
    assert [steps_for(t, 100) for t in (1, 100, 101, 1000)] == [1, 1, 2, 10]


def test_batching_is_stdlib_only():
    """Analysis imports it (it never imports torch), so it may import nothing outside the standard library."""
    code = ("import sys; before = set(sys.modules); import cbs.batching\n"
            "new = [m for m in set(sys.modules) - before if m.split('.')[0] not in sys.stdlib_module_names\n"
            "       and m not in ('cbs', 'cbs.batching')]\n"
            "assert not new, new\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
