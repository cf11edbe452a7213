"""The stop request: a signal is never lost, whenever it lands (unit level; the multi-rank jobs are in
test_slurm.py)."""
from __future__ import annotations

import os
import signal

import torch

from qlora_dist.train.preempt import StopRequest


def test_a_signal_landing_during_the_agreement_is_carried_to_the_next_one(monkeypatch):
    """Two ranks, as the collective sees it: the signal reaches this rank while the all-reduce is in
    flight. That answer is 0 (the value was already sent); the next must be the signal, not 0."""
    calls = []

    def all_reduce(flag, op=None):
        calls.append(int(flag.item()))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # lands mid-collective; the peer had nothing either

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    stop = StopRequest()
    try:
        assert stop.agreed() == 0
        assert stop.agreed() == signal.SIGUSR1
        assert calls == [0, signal.SIGUSR1]
    finally:
        stop.restore()
