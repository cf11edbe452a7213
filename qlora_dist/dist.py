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
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from qlora_dist import compat
from qlora_dist.errors import RunFault


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class SequenceGroups:
    """Where a rank stands under dist.sequence_parallel=N, in DeepSpeed 0.19.8's layout
    (parallel_state_sp.initialize_sequence_parallel): ranks [g*N, (g+1)*N) form group g and share its
    rows, each holding 1/N of every row's positions; g is the rank's place in data parallelism."""
    size: int  # N
    rank: int
    world_size: int

    @property
    def data_rank(self) -> int:
        return self.rank // self.size

    @property
    def data_world(self) -> int:
        return self.world_size // self.size

    @property
    def sequence_rank(self) -> int:
        """Which 1/N slice of each row this rank holds."""
        return self.rank % self.size


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


def expand_hostlist(spec: str) -> list[str]:
    """Slurm's compressed node list, e.g. 'gpu[01-03,07],login2' -> gpu01 gpu02 gpu03 gpu07 login2."""
    hosts, i = [], 0
    while i < len(spec):
        j = i
        while j < len(spec) and spec[j] not in ",[":
            j += 1
        prefix = spec[i:j]
        if j < len(spec) and spec[j] == "[":
            end = spec.index("]", j)
            for part in spec[j + 1:end].split(","):
                lo, _, hi = part.partition("-")
                hosts += [f"{prefix}{n:0{len(lo)}d}" for n in range(int(lo), int(hi or lo) + 1)]
            j = end + 1
        elif prefix:
            hosts.append(prefix)
        i = j + 1 if j < len(spec) and spec[j] == "," else j
    return hosts


def rendezvous_port(job_id: str) -> int:
    """A port every rank of a Slurm job derives alike from its job id, in the unprivileged range."""
    return 20000 + int(job_id) % 20000


def slurm_env(environ=os.environ) -> dict[str, str] | None:
    """The launcher environment of a task that `srun` started (None outside a Slurm job step): rank
    from SLURM_PROCID, rendezvous at the first host of the step's node list on a port from the job id."""
    if "SLURM_STEP_ID" not in environ or "SLURM_PROCID" not in environ:
        return None
    nodes = expand_hostlist(environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"])
    world = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS", "1")
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "1")
    return {"RANK": environ["SLURM_PROCID"], "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": per_node.split("(")[0].split(",")[0],
            "NODE_RANK": environ.get("SLURM_NODEID", "0"), "MASTER_ADDR": nodes[0],
            "MASTER_PORT": environ.get("MASTER_PORT") or str(rendezvous_port(environ["SLURM_JOB_ID"]))}


def planned_ranks(environ=os.environ) -> list[dict[str, str]]:
    """Every task's launcher environment for the job `environ` describes (what srun will give each task,
    as slurm_env reads it): for printing a job's plan without starting it."""
    nodes = expand_hostlist(environ["SLURM_JOB_NODELIST"])
    per_node = int((environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "1"))
                   .split("(")[0].split(",")[0])
    ranks = []
    for rank in range(int(environ.get("SLURM_NTASKS", per_node * len(nodes)))):
        task = {**environ, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node),
                "SLURM_NODEID": str(rank // per_node), "SLURM_STEP_NODELIST": environ["SLURM_JOB_NODELIST"],
                "SLURM_STEP_NUM_TASKS": str(len(nodes) * per_node), "SLURM_STEP_TASKS_PER_NODE": str(per_node)}
        ranks.append({"host": nodes[rank // per_node], **slurm_env(task)})
    return ranks


def _single_process_env() -> None:
    # A task started by srun: Slurm's own variables say where it stands (nothing extra on the nodes).
    if "RANK" not in os.environ and (env := slurm_env()):
        os.environ.update(env)
    # DeepSpeed 0.19.8 without launcher env tries MPI discovery and fails importing mpi4py
    # (../shared/STACK-NOTES.md): a world of one gets the env a launcher would have set.
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))


def launcher_env() -> DistInfo:
    """This process's place in the job as the launcher (torchrun, deepspeed, srun) describes it, without
    joining the process group: for what rank 0 does alone before the ranks meet (the preflight)."""
    if "RANK" not in os.environ and (env := slurm_env()):
        return DistInfo(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]))
    return read_env()  # a plain process: a world of one (nothing is written into the environment here)


def local_ranks(info: DistInfo, environ=os.environ, unknown: int | None = None) -> int:
    """How many ranks the launcher started on this node (torchrun/srun: LOCAL_WORLD_SIZE, deepspeed:
    LOCAL_SIZE); where it says nothing, `unknown`, else as many as this rank's LOCAL_RANK implies."""
    told = environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE")
    return max(int(told or unknown or 1), info.local_rank + 1)


def gpu_index(info: DistInfo, gpus: int, backend: str, environ=os.environ) -> int:
    """This rank's GPU. NCCL runs one rank per GPU: since NCCL 2.5 two ranks on one GPU fail at the first
    collective ("Duplicate GPU detected", ncclInvalidUsage), after the model may have loaded. So more ranks
    than GPUs on a node is a launch error here, found by every rank alike before anything loads; under
    gloo (dist.backend=gloo) the ranks share the GPUs round-robin instead."""
    from qlora_dist.errors import ConfigError

    ranks = local_ranks(info, environ)
    if ranks <= gpus:
        return info.local_rank
    if backend == "gloo":
        return info.local_rank % gpus
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    raise ConfigError([
        f"{ranks} ranks on this node but {gpus} GPU(s) visible"
        f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}: NCCL runs one rank per GPU; "
        f"start at most {gpus} rank(s) per node (torchrun --nproc_per_node, deepspeed --num_gpus, "
        "srun --ntasks-per-node), or set dist.backend=gloo to let ranks share GPUs (slow: collectives through "
        "host memory)"])


def device_for(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        index = gpu_index(info, torch.cuda.device_count(), _BACKEND)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init(backend: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Join (or create) the process group; returns this process's place in it."""
    deepspeed = compat.import_deepspeed()  # the first import of deepspeed in a run: see there why

    _single_process_env()
    info = read_env()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    global _BACKEND, _ONE_OF_SEVERAL
    _BACKEND = backend
    quiet_other_ranks(info)
    _share_cpu_cores(info)
    device_for(info)
    if not torch.distributed.is_initialized():
        if folder := compat.deepspeed_cpu_op_to_build():
            log(f"building DeepSpeed's CPU communication op once (~40 s, cached in {folder})")
        compat.load_deepspeed_cpu_op()
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                   verbose=False)
    _ONE_OF_SEVERAL = _ONE_OF_SEVERAL or info.world_size > 1
    return info


_ONE_OF_SEVERAL = False  # this process joined a group of several ranks (see leave)
_BACKEND = "nccl"  # the process group's backend once init ran (device_for maps ranks to GPUs by it)


def leave(code: int) -> int:
    """How a process ends: `code` back to the caller, except for a process that was one of several ranks,
    which exits here without the interpreter's finalization (compat.exit_without_finalization says why)."""
    if _ONE_OF_SEVERAL:
        compat.exit_without_finalization(code)
    return code


def _share_cpu_cores(info: DistInfo) -> None:
    """CPU ranks on one machine split its cores: torchrun sets OMP_NUM_THREADS=1 but the `deepspeed`
    launcher sets nothing, and N ranks each using every core ran ZeRO-3 steps ~2.5x slower on 2 cores."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ or info.world_size == 1:
        return
    local = local_ranks(info, unknown=info.world_size)
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
    """Rank 0 of the process group, or, before it exists, rank 0 as the launcher describes it (ranks
    resolve the model and build DeepSpeed's op before they meet: only one of them should say so)."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return launcher_env().is_main


def log(message: str) -> None:
    """The one way progress reaches the terminal: rank 0 only."""
    if is_main():
        print(f"[qlora-dist] {message}", file=sys.stderr, flush=True)


def barrier(what: str = "reach the same point") -> None:
    """Every rank waits here for the others, at most dist.timeout_s (the group's timeout; a rank that is
    gone ends it at once): then one line naming what it waited for. Also at the end of every successful
    multi-rank job, before the group is torn down: a rank that destroyed its gloo group while rank 0 was
    still writing its files aborted at exit ("terminate called without an active exception", torch 2.13,
    deepspeed 0.19.8; 2 of ~40 two-rank runs in full suites, never in isolation)."""
    if torch.distributed.is_initialized():
        with _waiting_to(what):
            torch.distributed.barrier()


@contextmanager
def _waiting_to(what: str) -> Iterator[None]:
    """A collective's failure (a timeout after dist.timeout_s, or a rank gone) as one line naming what the
    ranks were waiting for, instead of the backend's traceback."""
    try:
        yield
    except RuntimeError as exc:  # torch's DistBackendError (gloo, nccl) is one
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RunFault(f"rank {torch.distributed.get_rank()}: waiting for every rank to {what}: {detail}") from None


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over ranks (losses, token counts) in one collective."""
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has that pid now (another user's counts: it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def broadcast_object(obj, src: int = 0, what: str = "receive rank 0's result"):
    """Rank src's object on every rank (work done once, e.g. tokenization, shared with the others)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj if torch.distributed.get_rank() == src else None]
    with _waiting_to(what):
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
        compat.forget_deepspeed_groups()


# ---------------------------------------------------------------------------- one rank waiting for another
HEARTBEAT_S = 2.0  # how often a rank doing work that others wait for shows it is alive


@contextmanager
def heartbeat(path: Path, every_s: float = HEARTBEAT_S) -> Iterator[None]:
    """While the block runs, a thread touches `path` every `every_s`: the ranks waiting for this one's
    work (wait_for) see that it is alive, under any launcher and across nodes (the file is in a folder
    they share)."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                path.touch()
            except OSError:  # a full or vanished folder: the waiters then time out, naming the file
                pass
            if stop.wait(every_s):
                return
    thread = threading.Thread(target=beat, name="qlora-dist-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(every_s + 5)


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def wait_for(ready: Callable[[], bool], what: str, alive: Path, timeout_s: float, poll_s: float = 0.5) -> None:
    """Wait until ready() (which may raise, e.g. rank 0's own error) while the rank doing the work shows
    it is alive (its `heartbeat` on `alive` changes); dist.timeout_s (`timeout_s`) with no change ends
    the wait with one line naming what it waited for. A file, not a collective, because the work (a
    cache build) may take longer than dist.timeout_s; a bare poll waited for ever for a rank 0 killed
    under a launcher that does not end the other ranks (mpirun, srun without --kill-on-bad-exit, ranks
    started by hand: issue 23). Change is judged by this host's clock, so clocks may differ between nodes."""
    seen, since = _mtime(alive), time.monotonic()
    while not ready():
        now = _mtime(alive)
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since > timeout_s:
            raise RunFault(f"rank {read_env().rank}: waited for rank 0 to {what}, but rank 0 showed no sign of "
                           f"life for {timeout_s:g} s (dist.timeout_s; its heartbeat {alive} "
                           f"{'never appeared' if seen is None else 'stopped'}): it is gone or stuck, so this rank stops")
        time.sleep(poll_s)
