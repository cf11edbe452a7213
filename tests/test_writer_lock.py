"""One writer per output folder (qlora_dist/writer_lock.py): a live holder is refused and named; a stale
one (its process gone on this host, the same Slurm job requeued, no heartbeat for too long) is taken over
with a line saying so; the heartbeat moves; a holder killed with SIGKILL never locks a folder out. On this
host the OS lock is the truth: a record whose pid was reused (by an unrelated process, or by this very run
in a fresh pid namespace) does not refuse; a record of another kernel with the same hostname does."""
from __future__ import annotations

import json
import os
import shutil
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


OTHER_KERNEL = "0b0e5c1a-another-kernel"  # a boot_id of another host (or of this one before a reboot)


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
        _plant(paths, host="node-that-died", boot_id=OTHER_KERNEL, slurm_job_id="4242")
        expected = "this Slurm job (4242), requeued"
    else:
        _plant(paths, host="node-that-died", boot_id=OTHER_KERNEL,
               heartbeat_at=time.time() - writer_lock.STALE_AFTER_S - 5)
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
    _plant(paths, host="gpu-node-17", boot_id=OTHER_KERNEL, pid=999_999, slurm_job_id="77",
           heartbeat_at=time.time() - 12)
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


@pytest.mark.parametrize("case", ["an unrelated live process", "this run itself"])
def test_a_record_whose_pid_was_reused_on_this_host_is_taken_over(tmp_path, case):
    """O5/O6 of the 2026-12-07 red team: the holder was killed with -9 and its pid now names another live
    process (a `sleep`), or this run (a restarted container's new pid namespace: pid 1 again). The OS lock
    is free on this host, so the record is stale: taken over at once with a line naming why."""
    paths = RunPaths(tmp_path / "out")
    sleeper = subprocess.Popen(["sleep", "60"]) if case == "an unrelated live process" else None
    try:
        pid = sleeper.pid if sleeper else os.getpid()
        _plant(paths, pid=pid, heartbeat_at=time.time() - 40)
        assert not writer_lock.live_holder(paths)[0]  # the preflight agrees
        lock, said = _acquire(paths)
        lock.release()
    finally:
        if sleeper:
            sleeper.kill()
            sleeper.wait(timeout=10)
    now_is = "another process" if sleeper else "this run"
    assert len(said) == 1 and f"from pid {pid} on {socket.gethostname()}" in said[0], said
    assert "OS lock on this host was free" in said[0] and f"its pid {pid} is {now_is} now" in said[0], said


def test_the_same_hostname_on_another_kernel_is_another_host(tmp_path):
    """Containers on two machines may share a hostname: a fresh record of another kernel refuses although
    its host name is ours and its pid is alive here (it is ours)."""
    paths = RunPaths(tmp_path / "out")
    _plant(paths, boot_id=OTHER_KERNEL, heartbeat_at=time.time() - 5)
    with pytest.raises(ConfigError) as err:
        WriterLock(paths, log=lambda m: None).acquire()
    assert f"pid {os.getpid()} on {socket.gethostname()}" in str(err.value)


def test_a_folder_at_the_lock_path_is_one_line_naming_it(tmp_path):
    """O7: `mkdir OUTPUT/.lock` gave an IsADirectoryError traceback; now the preflight and the lock say it."""
    paths = RunPaths(tmp_path / "out")
    paths.lock.mkdir(parents=True)
    for attempt in (lambda: writer_lock.live_holder(paths), lambda: WriterLock(paths, log=print).acquire()):
        with pytest.raises(ConfigError) as err:
            attempt()
        assert err.value.problems == [f"train.output_dir: {paths.lock} cannot be the run's lock file (it is a "
                                      "folder); remove it: the run creates it"]


HOLD = ("import sys, time; from pathlib import Path; from qlora_dist.paths import RunPaths; "
        "from qlora_dist.writer_lock import WriterLock; "
        "WriterLock(RunPaths(Path(sys.argv[1])), log=lambda m: print(m, flush=True)).acquire(); "
        "print('held', flush=True); time.sleep(120)")


def _in_new_pid_namespace(out) -> subprocess.Popen:
    return subprocess.Popen(["unshare", "-fp", "--mount-proc", sys.executable, "-c", HOLD, str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare as root")
def test_a_container_restarted_in_a_fresh_pid_namespace_takes_its_folder_back(tmp_path):
    """O6 for real: a run as pid 1 of a new pid namespace is killed with -9 (the whole namespace); the
    restarted run is pid 1 again and takes the folder over instead of refusing itself."""
    out = tmp_path / "out"
    first = _in_new_pid_namespace(out)
    try:
        assert first.stdout.readline().strip() == "held"
        assert read_holder(RunPaths(out)).pid == 1
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    second = _in_new_pid_namespace(out)
    try:
        said = second.stdout.readline().strip()
        assert "taking over the lock" in said and "its pid 1 is this run now" in said, said
        assert second.stdout.readline().strip() == "held"
    finally:
        os.killpg(second.pid, signal.SIGKILL)
        second.wait(timeout=30)
