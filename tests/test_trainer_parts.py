"""The pretrain Trainer's parts on their own: the checkpoint's TrainState and its on-disk dict (every older form
loads, the keys stay those every cbs version reads), a hook that stops the run, the stop signals' handling, and the
Trainer built for a bench (no run directory) training real text."""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import pytest
import torch

from cbs.pipeline.checkpointing import TrainState
from cbs.pipeline.stopping import STOP_SIGNALS, Stop, StopVote
from test_pretrain import SEQ, make_cfg

# The dict every cbs version so far stored under client_state["cbs"] (the newest form): its keys and value types.
STORED = {"step": 10, "first_loss": 6.3, "last_eval": {"raw": 5.1, "ewa/0.9": 5.0},
          "targets": {"targets": [6.0], "crossings": {"raw": [None]}, "previous": {}}, "elapsed": 12.5,
          "world_size": 1, "zero_stage": 1, "noise_scale": {"ema_small": 1.0}, "torch_rng": torch.get_rng_state(),
          "loss_window": [4.5, 3], "batch_decisions": [{"step": 4, "tokens": 1024, "batch": 16, "b_simple": 9.0}]}


def test_train_state_round_trips_the_stored_dict_key_for_key():
    state = TrainState.from_dict(STORED)
    assert state.loss_window == (4.5, 3) and state.batch_decisions == STORED["batch_decisions"]
    again = state.to_dict()
    assert list(again) == list(STORED)  # the same keys: a checkpoint written now loads in an older cbs
    for key, value in STORED.items():
        assert torch.equal(again[key], value) if key == "torch_rng" else again[key] == value, key


def test_train_state_reads_a_checkpoint_from_before_the_noise_scale_loss_window_and_ramp():
    oldest = {k: v for k, v in STORED.items() if k not in ("noise_scale", "loss_window", "batch_decisions")}
    state = TrainState.from_dict(oldest)
    assert state.noise_scale is None  # the trainer keeps the noise scale's fresh state
    assert state.loss_window == (0.0, 0) and state.batch_decisions == []  # the window restarts; no decisions
    assert state.step == 10 and state.first_loss == 6.3 and state.last_eval == STORED["last_eval"]


def test_a_stop_signal_is_noted_and_a_second_one_would_end_the_process():
    """Within `catching`, the first signal is only noted (the step finishes, the loop stops at the vote); the
    handlers then fall back to the default (a second signal ends the process); after the block the old ones are
    back."""
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    vote = StopVote(world_size=1)
    assert not vote.signalled()
    with vote.catching():
        os.kill(os.getpid(), signal.SIGUSR1)
        assert vote.stop_signal == signal.SIGUSR1 and vote.signalled()
        assert not vote.step_overdue()  # within STEP_STOP_GRACE_S of the signal
        assert all(signal.getsignal(s) == signal.SIG_DFL for s in STOP_SIGNALS)
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
    assert vote.agreed_failure("bad file") == "bad file" and vote.agreed_failure(None) is None


@pytest.fixture(scope="module")
def trainer(stdlib_data, tmp_path_factory):
    """A real Trainer (tiny model, DeepSpeed on CPU) of a run directory; nothing is written until `run`."""
    from cbs.pipeline.distributed import init_distributed
    from cbs.pipeline.pretrain import Trainer

    cfg = make_cfg(stdlib_data, tmp_path_factory.mktemp("parts") / "run")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return Trainer(cfg, init_distributed(cfg.seed))


class StopAt:
    """A hook that asks to stop after a given step, and records the steps it ran at."""

    def __init__(self, step: int):
        self.step, self.ran = step, []

    def due(self, step: int) -> bool:
        return True

    def __call__(self, step: int):
        self.ran.append(step)
        return Stop("targets") if step == self.step else None


def test_a_hook_that_returns_a_stop_ends_the_loop_after_that_step(trainer):
    stopper, after = StopAt(3), StopAt(-1)
    trainer.hooks = [stopper, after]
    assert trainer.train() == "targets" and trainer.step == 3 and trainer.stop == Stop("targets")
    assert stopper.ran == [1, 2, 3] and after.ran == [1, 2]  # the hooks after a Stop do not run for its step
    assert not trainer.run_dir.exists()


def test_the_divergence_guard_compares_with_the_first_logged_loss(trainer):
    guard = trainer.log_hook
    guard.first_loss = None
    assert guard.divergence(6.0, 1) is None and guard.first_loss == 6.0
    assert guard.divergence(6.0 * trainer.cfg.divergence_factor, 2) is None
    stop = guard.divergence(6.0 * trainer.cfg.divergence_factor + 0.1, 3)
    assert stop.reason == "diverged" and "at step 3 (first logged 6" in stop.why
    assert guard.divergence(float("nan"), 4).reason == "diverged"


def test_the_bench_trainer_lowers_the_loss_on_real_text_without_a_run_directory(stdlib_data, tmp_path,
                                                                                 monkeypatch):
    """Trainer.for_bench: the run's own train_step (data from the shards, micro-batch x accumulation, EWA) from
    pretrain keys without run_dir; it reads and writes no run directory (none is named; the working directory
    stays empty)."""
    from cbs.pipeline.distributed import init_distributed
    from cbs.pipeline.pretrain import Trainer

    monkeypatch.chdir(tmp_path)
    settings = {"data_dir": str(stdlib_data), "model": {"preset": "tiny", "seq_len": SEQ}, "global_batch_seqs": 8,
                "micro_batch_seqs": 4, "train_tokens": 8 * SEQ * 40, "seed": 7, "optimizer": {"lr": 3e-3}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer = Trainer.for_bench(settings, init_distributed(7))
    assert trainer.hooks == [] and trainer.grad_accum == 2
    losses = [trainer.train_step().item() for _ in range(40)]
    assert trainer.step == 40 and trainer.engine.global_steps == 40
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0  # real learning on real text (measured ~6.2 -> ~4)
    assert list(Path(tmp_path).iterdir()) == []
