"""One writer per output folder: the lock rank 0 holds for a run's whole life.

Two layers, because shared filesystems differ:
- an OS file lock (filelock's flock on OUTPUT/.lock): the kernel releases it when its holder dies
  (SIGKILL, a lost node), and a second process on any node that shares the lock cannot take it;
- a holder record (OUTPUT/.lock.json: host, pid, Slurm job id, start time, a heartbeat every
  HEARTBEAT_S seconds), which names the holder in the refusal and covers filesystems whose flock is
  local to a node (Lustre mounted with `localflock`, some NFS set-ups): there a free OS lock with a live
  record of another host still refuses.
A record is stale, and taken over with a log line, when its pid is gone on this same host, when it is
this same Slurm job (a requeue: its earlier incarnation is over), or when its heartbeat is older than
STALE_AFTER_S (a holder on a node that died without removing it).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

from qlora_dist import atomic
from qlora_dist.errors import ConfigError
from qlora_dist.paths import RunPaths

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats


@dataclass
class Holder:
    host: str
    pid: int
    slurm_job_id: str | None
    started_at: float
    heartbeat_at: float

    @classmethod
    def me(cls) -> "Holder":
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID"), now, now)

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return (f"pid {self.pid} on {self.host}{job}, started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started_at))}, "
                f"last heartbeat {max(0.0, now - self.heartbeat_at):.0f} s ago")


def read_holder(paths: RunPaths) -> Holder | None:
    """The holder record, or None when there is none (or it is unreadable: a holder that died while
    writing it cannot be holding the lock)."""
    try:
        return Holder(**json.loads(paths.lock_record.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def stale_reason(holder: Holder, now: float | None = None) -> str | None:
    """Why `holder` no longer writes the folder, or None when it may still."""
    now = time.time() if now is None else now
    if holder.host == socket.gethostname() and not _pid_alive(holder.pid):
        return f"its process {holder.pid} is gone"
    if holder.slurm_job_id and holder.slurm_job_id == os.environ.get("SLURM_JOB_ID"):
        return f"it is this Slurm job ({holder.slurm_job_id}), requeued"
    if now - holder.heartbeat_at > STALE_AFTER_S:
        return f"no heartbeat for {now - holder.heartbeat_at:.0f} s (limit {STALE_AFTER_S:.0f} s)"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def busy_problem(paths: RunPaths, holder: Holder | None) -> str:
    who = holder.describe() if holder else "a process that has not written its record yet"
    return (f"train.output_dir: {paths.root} is being written by another run now ({who}; lock {paths.lock}); "
            "wait for it, or use another output folder")


def live_holder(paths: RunPaths) -> tuple[bool, Holder | None]:
    """(whether another run writes the folder now, its record). Takes nothing: for the preflight."""
    from filelock import Timeout

    if not paths.root.is_dir():
        return False, None
    holder = read_holder(paths)
    if paths.lock.is_file():
        try:
            with paths.writer_lock():
                pass
        except Timeout:
            return True, holder
    return (holder is not None and holder.pid != os.getpid() and stale_reason(holder) is None), holder


class WriterLock:
    """Held by rank 0 from setup to cleanup: `acquire` refuses (ConfigError) or takes the folder over;
    a daemon thread refreshes the heartbeat; `release` removes the record and frees the OS lock."""

    def __init__(self, paths: RunPaths, log=print):
        self.paths, self.log = paths, log
        self.os_lock = paths.writer_lock()
        self.record: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        from filelock import Timeout

        self.paths.root.mkdir(parents=True, exist_ok=True)
        try:
            self.os_lock.acquire()
        except Timeout:
            raise ConfigError([busy_problem(self.paths, read_holder(self.paths))]) from None
        previous = read_holder(self.paths)
        if previous is not None:
            reason = stale_reason(previous)
            if reason is None:  # the OS lock was free, yet a live holder on another node: flock is node-local here
                self.os_lock.release()
                raise ConfigError([busy_problem(self.paths, previous)])
            self.log(f"taking over the lock of {self.paths.root} from {previous.describe()}: {reason}")
        self.record = Holder.me()
        self._write()
        self._thread = threading.Thread(target=self._beat, name="qlora-dist-heartbeat", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        atomic.write_text(self.paths.lock_record, json.dumps(asdict(self.record)))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.record.heartbeat_at = time.time()
            try:
                self._write()
            except OSError:  # a full or vanished disk: the run itself will say so when it next writes
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.record is not None:
            self.paths.lock_record.unlink(missing_ok=True)
            self.record = None
        if self.os_lock.is_locked:
            self.os_lock.release()
