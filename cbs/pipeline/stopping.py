"""How a pretrain run stops before its budget: stop signals, the ranks' vote on them, and `Stop`, a hook's request.

SIGTERM, SIGUSR1 or SIGINT (a Slurm preemption or time limit, a study stopped, Ctrl-C) are only noted: the step
in flight finishes, every rank agrees on the step to stop at (`StopVote.signalled`), the run saves a checkpoint
and exits with status `preempted` (EXIT_PREEMPTED). A second signal ends the process at once. A one-rank step still
running STEP_STOP_GRACE_S after the signal is abandoned (StepAbandoned): a Slurm grace period would end in SIGKILL
before the step and its save. The vote's gloo group also makes ranks agree on a checkpoint load that failed on any
of them (`StopVote.agreed_failure`).

A hook asks the loop to stop by returning a `Stop` (diverged, every target reached); the loop ends after the step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
STEP_STOP_GRACE_S = 10.0
"""A one-rank step still running this long after a stop signal is abandoned (docs: README, "Preemption")."""
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: "try again later"; jobs/pretrain.sbatch requeues on it

DIVERGED, TARGETS, PREEMPTED = "diverged", "targets", "preempted"
"""Stop reasons; a run that trains its budget ends with "budget", one whose step was abandoned with "abandoned"."""


@dataclass(frozen=True)
class Stop:
    """A request to end the run after the current step: `reason` (DIVERGED, TARGETS, PREEMPTED) and, for
    result.json's `reason` where the reason alone does not say it, `why` (what diverged, and where)."""

    reason: str
    why: str = ""


class StepAbandoned(Exception):
    """Raised inside a step that outlived STEP_STOP_GRACE_S after a stop signal; the run ends without a save."""


def signal_name(signum: Optional[int]) -> str:
    return signal.Signals(signum).name if signum else "a signal"


@contextlib.contextmanager
def stop_signals(handler):
    """Route SIGTERM/SIGUSR1/SIGINT to `handler` for the block (main thread only), then restore the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class StopVote:
    """The stop signal this process got, and the ranks' agreement on it.

    Ranks must agree on the step they stop at, or their checkpoint saves would not line up. A flag is all-reduced
    over a gloo group on the host, asynchronously: launched after step t, read after step t + 1, so the round trip
    overlaps a step (no GPU sync, no wait) and a stop lands one step later. Create it on every rank at the same
    point (the group's creation is collective).
    """

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.stop_signal: Optional[int] = None  # set by the handler: the first signal names the reason
        self._signal_time = 0.0  # time.monotonic() of the first stop signal
        self._group = None
        self._vote: Optional[tuple] = None  # (the all-reduce in flight, its flag tensor)
        if world_size > 1:
            import torch.distributed as torch_dist

            self._group = torch_dist.new_group(backend="gloo")

    def on_signal(self, signum, frame) -> None:
        """Only note it: the step in flight finishes, then the loop stops and the run saves. A second stop signal
        gets the default action (the process ends at once), for a user who does not want to wait."""
        if self.stop_signal is None:
            self.stop_signal = signum
            self._signal_time = time.monotonic()
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_DFL)

    def catching(self):
        """The block during which stop signals are noted (`on_signal`) instead of ending the process."""
        return stop_signals(self.on_signal)

    def step_overdue(self) -> bool:
        """A stop signal came STEP_STOP_GRACE_S ago and the step still runs (a huge batch, a slow host). Only with
        one rank: ranks that left an accumulation at different micro-batches would wait on each other's
        reductions."""
        return (self.stop_signal is not None and self.world_size == 1
                and time.monotonic() - self._signal_time > STEP_STOP_GRACE_S)

    def signalled(self) -> bool:
        """True on every rank, at the same step, once any rank got a stop signal: each step reads the vote launched
        after the step before (every rank launches and reads the same votes, so all agree) and launches the next."""
        if self._group is None:
            return self.stop_signal is not None
        import torch.distributed as dist

        agreed = False
        if self._vote is not None:
            work, flag = self._vote
            work.wait()
            agreed = bool(flag.item())
        flag = torch.tensor([int(self.stop_signal is not None)])
        self._vote = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return agreed

    def settle(self) -> None:
        """Wait for the vote still in flight when training ends (every rank launched it), so none is left."""
        if self._vote is not None:
            self._vote[0].wait()
            self._vote = None

    def agreed_failure(self, problem: Optional[str]) -> Optional[str]:
        """A failure on any rank is a failure on all (every rank must take the same checkpoint): `problem` if this
        rank failed, "failed on another rank" if another did, None if none did. Every rank calls it together."""
        if self._group is None:
            return problem
        import torch.distributed as dist

        flag = torch.tensor([int(problem is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return (problem or "failed on another rank") if flag.item() else None
