"""Every wait of one rank for another ends (issue 23, T10): with the ranks started by hand (no torchrun
to end the others), rank 0 killed -9 while it builds the data cache: rank 1 stops within dist.timeout_s
of rank 0's last sign of life, with one line naming what it waited for."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, free_port
from qlora_dist.errors import RunFault
from qlora_dist import dist

TIMEOUT_S = 3


def test_rank_1_stops_within_the_timeout_when_rank_0_is_killed(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {i}", "output": str(i)}) + "\n" for i in range(20)))
    cache, port = tmp_path / "cache", free_port()
    script = REPO / "tests" / "workers" / "rank_wait.py"
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(data), str(cache), str(TIMEOUT_S)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob(".*.*-*")):  # rank 0's state file: it is "building", rank 1 waiting
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.2)
        time.sleep(1)
        procs[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = procs[1].communicate(timeout=TIMEOUT_S + 30)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[1].returncode == RunFault.EXIT_CODE, err
    assert f"rank 1: waited for rank 0 to build or check the tokenized-data cache {cache}/" in err, err
    assert f"showed no sign of life for {TIMEOUT_S} s (dist.timeout_s" in err and "stopped)" in err, err
    assert TIMEOUT_S - dist.HEARTBEAT_S <= waited <= TIMEOUT_S + 10, waited


def test_a_wait_ends_on_the_workers_verdict_or_its_error(tmp_path):
    """dist.wait_for returns when ready, passes on the error ready() raises, and waits as long as the
    heartbeat moves (here 3 x the timeout), then stops within the timeout once it does not."""
    alive = tmp_path / "alive"
    with dist.heartbeat(alive, every_s=0.1):
        start = time.monotonic()
        dist.wait_for(lambda: time.monotonic() - start > 1.5, "finish", alive, timeout_s=0.5, poll_s=0.05)
    with pytest.raises(ValueError, match="rank 0's own error"):
        dist.wait_for(lambda: (_ for _ in ()).throw(ValueError("rank 0's own error")), "x", alive, 5)
    start = time.monotonic()
    with pytest.raises(RunFault, match=r"to finish, but rank 0 showed no sign of life for 0.5 s .*stopped\)"):
        dist.wait_for(lambda: False, "finish", alive, timeout_s=0.5, poll_s=0.05)
    assert time.monotonic() - start < 1.5
    with pytest.raises(RunFault, match="never appeared"):
        dist.wait_for(lambda: False, "finish", tmp_path / "nothing", timeout_s=0.2, poll_s=0.05)
