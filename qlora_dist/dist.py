"""Process-group set-up and rank helpers.

Reads the environment that torchrun and the `deepspeed` launcher set (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT); a plain `python -m qlora_dist train` with none of it is a world of one.
Only rank 0 prints: every progress message goes through `log`.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env() -> DistInfo:
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def _single_process_env() -> None:
    # DeepSpeed 0.19.8 without launcher env tries MPI discovery and fails importing mpi4py
    # (../shared/STACK-NOTES.md): a world of one gets the env a launcher would have set.
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))


def device_for(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def init(backend: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Join (or create) the process group; returns this process's place in it."""
    import deepspeed

    _single_process_env()
    info = read_env()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    quiet_other_ranks(info)
    _share_cpu_cores(info)
    device_for(info)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                   verbose=False)
    return info


def _share_cpu_cores(info: DistInfo) -> None:
    """CPU ranks on one machine split its cores: torchrun sets OMP_NUM_THREADS=1 but the `deepspeed`
    launcher sets nothing, and N ranks each using every core ran ZeRO-3 steps ~2.5x slower on 2 cores."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ or info.world_size == 1:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or info.world_size)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def quiet_other_ranks(info: DistInfo) -> None:
    """Library chatter is for rank 0; other ranks keep errors only."""
    if info.is_main:
        return
    warnings.filterwarnings("ignore")
    for name in ("DeepSpeed", "deepspeed", "transformers", "peft", "bitsandbytes", "datasets", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def log(message: str) -> None:
    """The one way progress reaches the terminal: rank 0 only."""
    if is_main():
        print(f"[qlora-dist] {message}", file=sys.stderr, flush=True)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over ranks (losses, token counts) in one collective."""
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def broadcast_object(obj, src: int = 0):
    """Rank src's object on every rank (work done once, e.g. tokenization, shared with the others)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj if torch.distributed.get_rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj):
    """Every rank's object, in rank order, on every rank."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
