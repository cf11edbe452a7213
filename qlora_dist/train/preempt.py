"""Preemption and time limits: a signal becomes a checkpoint at an agreed step boundary, then an exit.

Slurm sends SIGUSR1 (our sbatch scripts ask for it with `--signal=USR1@<seconds>`) or SIGUSR2 (submitit's
default) ahead of the time limit, and SIGTERM when it preempts or cancels a job. The handler only records
the signal. After every optimizer step all ranks take the maximum of what they recorded (one small
all-reduce), so they stop at the same step even when the signal reached them at different moments; the
trainer saves a complete checkpoint and asks `finish` to end the process:
- under submitit, submitit's own handler (which we replaced) then pickles the job and requeues it;
- under plain Slurm, rank 0 runs `scontrol requeue $SLURM_JOB_ID` for USR1/USR2 (a time-limit warning);
  after SIGTERM Slurm itself decides (it requeues preempted jobs configured so, not cancelled ones);
- elsewhere the process exits with 128 + the signal number, as if the signal had ended it.
The requeued job runs the same command, which continues from the newest complete checkpoint.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch

from qlora_dist.launch import dist

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class StopRequest:
    def __init__(self):
        self.received = 0
        self.previous: dict[int, object] = {}
        for sig in SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._record)
            except ValueError:  # not the main thread (e.g. a notebook runner): signals stay as they were
                pass

    def _record(self, signum, frame) -> None:
        self.received = signum

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

    def finish(self, signum: int) -> None:
        """After the checkpoint is complete on every rank: hand over to whoever requeues, then exit."""
        previous = self.previous.get(signum)
        self.restore()
        name = signal.Signals(signum).name
        dist.barrier()  # every rank is past its save before anyone requeues (which ends the job)
        if callable(previous) and getattr(previous, "__self__", None).__class__.__name__ == "SignalHandler":
            dist.log(f"{name}: checkpoint saved; submitit requeues the job")
            previous(signum, None)  # submitit: rank 0 requeues and exits; other ranks return here
        elif os.environ.get("SLURM_JOB_ID") and signum != signal.SIGTERM and dist.is_main():
            job = os.environ["SLURM_JOB_ID"]
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            dist.log(f"{name}: checkpoint saved; " + (f"requeued Slurm job {job}" if done.returncode == 0 else
                                                       f"could not requeue job {job}: {done.stderr.strip()}"))
        else:
            dist.log(f"{name}: checkpoint saved; exiting")
        dist.shutdown()
        sys.exit(128 + signum)
