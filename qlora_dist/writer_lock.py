"""One writer per output folder: the lock rank 0 holds for a run's whole life.

Two layers, because shared filesystems differ:
- an OS file lock (filelock's flock on OUTPUT/.lock): the kernel releases it when its holder dies
  (SIGKILL, a lost node), and a second process on any node that shares the lock cannot take it;
- a holder record (OUTPUT/.lock.json: host, pid, Slurm job id, start time, a heartbeat every
  HEARTBEAT_S seconds), which names the holder in the refusal and covers filesystems whose flock is
  local to a node (Lustre mounted with `localflock`, some NFS set-ups): there a free OS lock with a live
  record of another host still refuses.
On the same host the OS lock is the truth and the record only evidence for other hosts: once the OS
lock is free, a record written under this same kernel (its `boot_id`; a hostname alone can be shared by
containers, and a pid is reused after a kill -9 or repeats in a fresh pid namespace: a restarted
container's run is pid 1 like the dead one) is stale, whatever process its pid names now. A record of
another host is stale when it is this same Slurm job (a requeue: its earlier incarnation is over), or
when its heartbeat is older than STALE_AFTER_S (a holder on a node that died without removing it).
A stale record is taken over with a log line.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from qlora_dist import atomic, dist
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
    boot_id: str = ""  # the kernel it ran under (records written before this field: "", judged by host)

    @classmethod
    def me(cls) -> "Holder":
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID"), now, now, _boot_id())

    def on_this_host(self) -> bool:
        """Written under this kernel, so the OS lock here would have seen its holder."""
        return self.boot_id == _boot_id() if self.boot_id else self.host == socket.gethostname()

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return (f"pid {self.pid} on {self.host}{job}, started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started_at))}, "
                f"last heartbeat {max(0.0, now - self.heartbeat_at):.0f} s ago")


def _boot_id() -> str:
    """This kernel's id, shared by every container on it and new at each boot (Linux); elsewhere the
    hostname stands in."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def read_holder(paths: RunPaths) -> Holder | None:
    """The holder record, or None when there is none (or it is unreadable: a holder that died while
    writing it cannot be holding the lock). Keys this version does not know are ignored."""
    try:
        record = json.loads(paths.lock_record.read_text())
        return Holder(**{f.name: record[f.name] for f in fields(Holder) if f.name in record})
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def stale_reason(holder: Holder, now: float | None = None) -> str | None:
    """Why `holder` no longer writes the folder, or None when it may still. Only asked once the OS lock
    was found free (a holder that has it is refused before its record is read)."""
    now = time.time() if now is None else now
    if holder.on_this_host():
        if not dist.pid_alive(holder.pid):
            return f"its process {holder.pid} is gone"
        now_is = "this run" if holder.pid == os.getpid() else "another process"
        return (f"the OS lock on this host was free, so that run is over (its pid {holder.pid} is {now_is} "
                "now: reused after a kill, or a new pid namespace)")
    if holder.slurm_job_id and holder.slurm_job_id == os.environ.get("SLURM_JOB_ID"):
        return f"it is this Slurm job ({holder.slurm_job_id}), requeued"
    if now - holder.heartbeat_at > STALE_AFTER_S:
        return f"no heartbeat for {now - holder.heartbeat_at:.0f} s (limit {STALE_AFTER_S:.0f} s)"
    return None


def busy_problem(paths: RunPaths, holder: Holder | None) -> str:
    who = holder.describe() if holder else "a process that has not written its record yet"
    return (f"train.output_dir: {paths.root} is being written by another run now ({who}; lock {paths.lock}); "
            "wait for it, or use another output folder")


def lock_file_problem(paths: RunPaths, exc: OSError | None = None) -> str | None:
    """Why OUTPUT/.lock cannot serve as the OS lock (something else stands at its path), or None."""
    if exc is None and (not paths.lock.exists() or paths.lock.is_file()):
        return None
    why = "it is a folder" if paths.lock.is_dir() else "not a regular file" if exc is None else exc.strerror
    return f"train.output_dir: {paths.lock} cannot be the run's lock file ({why}); remove it: the run creates it"


def live_holder(paths: RunPaths) -> tuple[bool, Holder | None]:
    """(whether another run writes the folder now, its record). Takes nothing: for the preflight."""
    from filelock import Timeout

    if not paths.root.is_dir():
        return False, None
    problem = lock_file_problem(paths)
    if problem:
        raise ConfigError([problem])
    holder = read_holder(paths)
    if paths.lock.is_file():
        try:
            with paths.writer_lock():
                pass
        except Timeout:
            return True, holder
    return (holder is not None and stale_reason(holder) is None), holder


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
        except OSError as exc:  # a folder (or a file we may not open) at OUTPUT/.lock
            raise ConfigError([lock_file_problem(self.paths, exc)]) from None
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
