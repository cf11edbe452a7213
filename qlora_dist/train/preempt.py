"""Preemption, time limits and Ctrl-C: a signal becomes (where steps would be lost) a checkpoint, then an exit.

Slurm sends SIGUSR1 (our sbatch scripts ask for it with `--signal=USR1@<seconds>`) or SIGUSR2 (submitit's
default) ahead of the time limit, and SIGTERM when it preempts or cancels a job; Ctrl-C sends SIGINT (under
torchrun to every rank). What the handler does depends on what a stop would lose:
- immediate mode (set-up: locking, data preparation, `from_pretrained`, engine start): nothing is lost,
  and waiting for a 65B load or a tokenization pass would outlast Slurm's grace period, so the handler
  ends the process at once (a SystemExit raised where the main thread is; no traceback);
- deferred mode (the layer-wise loader, training, evaluation, saves): the handler only records the signal.
  At agreed points — after every optimizer step, before every evaluation batch, after every loaded layer —
  all ranks take the maximum of what they recorded (`agreed`, one small all-reduce) and, if any rank got
  a signal, all raise `Stopped` at that same point. The trainer then saves a checkpoint if steps since the
  last one would be lost and calls `finish`. A save is never interrupted: a signal during it (a second one
  included) is only recorded, and acted on at the next point, after the save has completed.
Every rank reaches every point the same number of times (evaluation pads its shards to equal batch
counts; every rank loads every layer), so the all-reduce never waits for a rank that will not come.
Handing over after the stop (`finish`, or at once in immediate mode):
- under submitit, submitit's own handler (which we replaced) pickles the job and requeues it;
- under plain Slurm, rank 0 runs `scontrol requeue $SLURM_JOB_ID` for USR1/USR2 (a time-limit warning);
  after SIGTERM Slurm itself decides (it requeues preempted jobs configured so, not cancelled ones);
- SIGINT is a person asking the run to end: never requeued;
- the process exits with 128 + the signal number (130 INT, 138 USR1, 140 USR2, 143 TERM).
The requeued job runs the same command, which continues from the newest complete checkpoint.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager

import torch

from qlora_dist import dist

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # time-limit warnings: scontrol requeue under plain Slurm

# Test hook, named as such: "PHASE[:N[:SIGNALS[:RANK]]]" — at the N-th pass (default 1) of PHASE (data,
# loading, engine, evaluate, mmlu, save, train) this process sends itself SIGNALS (default SIGTERM; several
# joined by "+", sent in order), on rank RANK only if given. Used by tests/test_preempt.py.
SIGNAL_AT_ENV = "QLORA_DIST_TEST_SIGNAL_AT"


class Stopped(BaseException):
    """Raised on every rank at the same agreed point when any rank received a signal. A BaseException,
    so that no `except Exception` on the way up (a library's or ours) mistakes it for a fault."""

    def __init__(self, signum: int, phase: str, passes: int):
        super().__init__(f"{signal.Signals(signum).name} during {phase}")
        self.signum, self.phase, self.passes = signum, phase, passes


def _test_signals(rank: int) -> tuple[str, int, list[int]] | None:
    spec = os.environ.get(SIGNAL_AT_ENV)
    if not spec:
        return None
    phase, count, names, only = (spec.split(":") + ["", "", ""])[:4]
    if only and int(only) != rank:
        return None
    return phase, int(count or 1), [signal.Signals[n].value for n in (names or "SIGTERM").split("+")]


class StopRequest:
    def __init__(self):
        self.received = 0
        self.received_at: tuple[str, int] | None = None  # (phase, passes) when this rank got the signal
        self.immediate = True  # nothing to lose yet: see the module docstring
        self.phase = "setup"
        self.passes: Counter[str] = Counter()  # points passed per phase: what the stop record reports
        self.test_signals = _test_signals(dist.launcher_env().rank)
        self.previous: dict[int, object] = {}
        for sig in SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._record)
            except ValueError:  # not the main thread (e.g. a notebook runner): signals stay as they were
                pass

    def _record(self, signum, frame) -> None:
        self.received = signum
        self.received_at = self.received_at or (self.phase, self.passes[self.phase])
        if self.immediate:
            self.immediate = False  # a second signal while this one unwinds only records
            self.exit_now(signum)

    @contextmanager
    def deferred(self):
        """Signals wait for an agreed point inside this block (the layer-wise loader); one that came after
        the block's last point ends the process when immediate mode returns (nothing is lost then)."""
        self.immediate = False
        yield  # Stopped (or a fault) leaves the block here, still deferred: the trainer handles it
        self.immediate = True
        if self.received:
            self.exit_now(self.received)

    def at(self, phase: str) -> None:
        """Entering `phase` (or one more pass of it): counted, and where a test asks, signalled."""
        self.phase = phase
        self.passes[phase] += 1
        if self.test_signals and self.test_signals[:2] == (phase, self.passes[phase]):
            for signum in self.test_signals[2]:
                os.kill(os.getpid(), signum)  # the handler runs before the next line

    def point(self, phase: str) -> None:
        """A place where all ranks may stop together; raises Stopped there if any rank got a signal.
        Collective: every rank must pass it equally often."""
        self.at(phase)
        if signum := self.agreed():
            raise Stopped(signum, phase, self.passes[phase])

    def agreed(self) -> int:
        """The signal any rank received (0: none), the same on every rank. Collective.

        `received` is only ever written by the handler: a signal that lands while the all-reduce is in
        flight is not in this answer, and must not be overwritten by it, so the next call carries it
        (writing the answer back lost such a signal: the job trained on to max_steps)."""
        flag = torch.tensor([self.received], dtype=torch.int64)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            if torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def exit_now(self, signum: int) -> None:
        """Immediate mode: nothing to save. No barrier: the other ranks may not have been signalled; they
        fail at their next collective with this rank gone, and the launcher (torchrun, srun) ends them."""
        self._hand_over(signum, f"during {self.phase}, nothing to save yet", _say_in_handler)

    def finish(self, signum: int, outcome: str) -> None:
        """After the checkpoint (if one was owed) is complete on every rank: hand over, then exit."""
        dist.barrier()  # every rank is past its save before anyone requeues (which ends the job)
        self._hand_over(signum, outcome, dist.log)

    def _hand_over(self, signum: int, outcome: str, say) -> None:
        previous = self.previous.get(signum)
        self.restore()
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            say(f"{name}: {outcome}; exiting (interrupted by hand: not requeued)")
        elif callable(previous) and getattr(previous, "__self__", None).__class__.__name__ == "SignalHandler":
            say(f"{name}: {outcome}; submitit requeues the job")
            previous(signum, None)  # submitit: rank 0 requeues and exits; other ranks return here
        elif os.environ.get("SLURM_JOB_ID") and signum in REQUEUE_SIGNALS and dist.is_main():
            job = os.environ["SLURM_JOB_ID"]
            # said before: a successful requeue cancels this step at once, and a line said after it can die
            # with the process (seen once on the localhost cluster, tests/test_slurm.py's preemption)
            say(f"{name}: {outcome}; requeueing Slurm job {job}")
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if done.returncode != 0:
                say(f"{name}: could not requeue job {job}: {done.stderr.strip()}; exiting")
        else:
            say(f"{name}: {outcome}; exiting")
        dist.shutdown()
        sys.exit(128 + signum)


def _say_in_handler(message: str) -> None:
    """dist.log from inside a signal handler: os.write, because the handler may interrupt a print to the
    same stream (a buffered writer entered again raises RuntimeError: reentrant call)."""
    if dist.is_main():
        os.write(sys.stderr.fileno(), f"[qlora-dist] {message}\n".encode())
