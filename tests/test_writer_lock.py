"""One writer per output folder (qlora_dist/writer_lock.py): a live holder is refused and named; a stale
one (its process gone on this host, the same Slurm job requeued, no heartbeat for too long) is taken over
with a line saying so; the heartbeat moves; a holder killed with SIGKILL never locks a folder out."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from qlora_dist import writer_lock
from qlora_dist.errors import ConfigError
from qlora_dist.paths import RunPaths
from qlora_dist.writer_lock import Holder, WriterLock, read_holder


def _plant(paths: RunPaths, **changes) -> Holder:
    """A holder record as another run would have left it (no OS lock held)."""
    holder = Holder(**{**Holder.me().__dict__, **changes})
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.lock_record.write_text(json.dumps(holder.__dict__))
    return holder


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _acquire(paths: RunPaths) -> tuple[WriterLock, list[str]]:
    said: list[str] = []
    lock = WriterLock(paths, log=said.append)
    lock.acquire()
    return lock, said


@pytest.mark.parametrize("case", ["pid gone on this host", "same Slurm job requeued", "heartbeat too old"])
def test_a_stale_holder_is_taken_over_with_a_line_saying_why(tmp_path, monkeypatch, case):
    paths = RunPaths(tmp_path / "out")
    if case == "pid gone on this host":
        _plant(paths, pid=_dead_pid())
        expected = "is gone"
    elif case == "same Slurm job requeued":
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        _plant(paths, host="node-that-died", slurm_job_id="4242")
        expected = "this Slurm job (4242), requeued"
    else:
        _plant(paths, host="node-that-died", heartbeat_at=time.time() - writer_lock.STALE_AFTER_S - 5)
        expected = "no heartbeat for"
    lock, said = _acquire(paths)
    try:
        assert len(said) == 1 and "taking over the lock" in said[0] and expected in said[0], said
        assert read_holder(paths).pid == os.getpid()
    finally:
        lock.release()
    assert not paths.lock_record.exists()


def test_a_live_holder_on_another_node_is_refused_even_where_flock_is_node_local(tmp_path):
    """The OS lock is free here (as on a filesystem whose flock does not span nodes), but the record of
    another host has a fresh heartbeat: refused, naming it; nothing of its record is touched."""
    paths = RunPaths(tmp_path / "out")
    _plant(paths, host="gpu-node-17", pid=999_999, slurm_job_id="77", heartbeat_at=time.time() - 12)
    before = paths.lock_record.read_bytes()
    with pytest.raises(ConfigError) as err:
        WriterLock(paths, log=lambda m: None).acquire()
    assert "pid 999999 on gpu-node-17, Slurm job 77" in str(err.value) and "heartbeat 12 s ago" in str(err.value)
    assert paths.lock_record.read_bytes() == before
    assert writer_lock.live_holder(paths)[0]  # what `check` and `submit` warn about


def test_the_heartbeat_moves_and_release_frees_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_lock, "HEARTBEAT_S", 0.05)
    paths = RunPaths(tmp_path / "out")
    lock, said = _acquire(paths)
    try:
        first = read_holder(paths).heartbeat_at
        time.sleep(0.5)
        assert read_holder(paths).heartbeat_at > first and said == []
    finally:
        lock.release()
    again, _ = _acquire(paths)  # free again, nothing to take over
    again.release()


def test_a_holder_killed_with_sigkill_is_named_then_taken_over(tmp_path):
    """A real second process holds the folder: refused with its pid; after kill -9 the kernel has freed the
    OS lock and its record names a dead pid: taken over."""
    paths = RunPaths(tmp_path / "out")
    code = ("import sys, time; from pathlib import Path; from qlora_dist.paths import RunPaths; "
            "from qlora_dist.writer_lock import WriterLock; "
            "WriterLock(RunPaths(Path(sys.argv[1]))).acquire(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(paths.root)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as err:
            WriterLock(paths, log=lambda m: None).acquire()
        assert f"pid {holder.pid} on {socket.gethostname()}" in str(err.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    lock, said = _acquire(paths)
    lock.release()
    assert f"process {holder.pid} is gone" in said[0]
