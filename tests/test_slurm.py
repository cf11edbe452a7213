"""Slurm and submitit: the sbatch scripts, multi-node rendezvous, preemption -> checkpoint -> requeue.

The cluster tests run a real Slurm cluster on this machine (tests/slurm_cluster.py: slurmctld, two
slurmd fake nodes, munge, slurmdbd with MariaDB); they skip with the reason where it cannot be installed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, free_port, load_adapter_tensors, read_metrics, run_cli
from qlora_dist.errors import ConfigError
from qlora_dist.dist import DistInfo, expand_hostlist, gpu_index, planned_ranks, slurm_env

SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
# Tiny model, 2 nodes x 2 ranks, ZeRO-2, global batch 8 (micro 2, one micro-batch per rank per step).
JOB_ARGS = [a for a in TINY if not a.startswith("model.path=")] + ["train.micro_batch_size=2"]


def _wait_for_steps(out: Path, steps: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if len([r for r in read_metrics(out) if "loss" in r]) >= steps:
                return
        except (FileNotFoundError, json.JSONDecodeError):  # not there yet, or a line half-written
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{out}: fewer than {steps} steps after {timeout} s")


def test_every_script_parses():
    assert {p.name for p in SCRIPTS} >= {"7b.sh", "13b.sh", "33b.sh", "65b.sh", "cpu-smoke.sh", "common.sh"}
    for script in SCRIPTS:
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, (script.name, done.stderr)


def test_hostlists_and_rank_environment():
    assert expand_hostlist("gpu[01-03,07],login2") == ["gpu01", "gpu02", "gpu03", "gpu07", "login2"]
    assert expand_hostlist("node1") == ["node1"] and expand_hostlist("a[9-11]") == ["a9", "a10", "a11"]
    env = slurm_env({"SLURM_STEP_ID": "0", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
                     "SLURM_STEP_NODELIST": "n[3-4]", "SLURM_STEP_NUM_TASKS": "16",
                     "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_ID": "4242"})
    assert env == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "NODE_RANK": "1",
                   "MASTER_ADDR": "n3", "MASTER_PORT": "24242"}
    assert slurm_env({"SLURM_PROCID": "0", "SLURM_JOB_ID": "1"}) is None  # the batch script itself: no step


def _job_env(tmp_path: Path) -> dict:
    """What Slurm sets in the batch script of a 2-node x 8-GPU job, plus the site variables."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(f"#!/bin/sh\ntouch {tmp_path}/srun-was-called\n")
    (fake / "srun").chmod(0o755)
    return {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "73519",
            "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_NTASKS": "16",
            "SLURM_NTASKS_PER_NODE": "8", "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_SUBMIT_DIR": str(REPO),
            "MODEL_PATH": "/models/llama-65b", "OUTPUT_DIR": "/shared/runs/65b", "PYTHON": sys.executable,
            "QLORA_ARGS": "train.save_steps=100"}


def test_dry_run_prints_every_rank_and_starts_nothing(tmp_path):
    done = subprocess.run(["bash", str(REPO / "slurm" / "65b.sh")], env={**_job_env(tmp_path), "DRY_RUN": "1"},
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "rendezvous: gpu07:33519, 16 ranks"
    command = (f"{sys.executable} -m qlora_dist train --preset 65b-all model.path=/models/llama-65b "
               "train.output_dir=/shared/runs/65b dist.ds_config=zero3 train.save_steps=100")
    assert lines[1] == f"gpu07: RANK=0 LOCAL_RANK=0 WORLD_SIZE=16 MASTER_ADDR=gpu07 MASTER_PORT=33519 {command}"
    assert lines[16] == f"gpu08: RANK=15 LOCAL_RANK=7 WORLD_SIZE=16 MASTER_ADDR=gpu07 MASTER_PORT=33519 {command}"
    assert len(lines) == 17 and not (tmp_path / "srun-was-called").exists()


def test_a_missing_site_variable_is_named(tmp_path):
    env = _job_env(tmp_path)
    del env["MODEL_PATH"]
    done = subprocess.run(["bash", str(REPO / "slurm" / "65b.sh")], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "MODEL_PATH" in done.stderr and "Hugging Face LLaMA folder" in done.stderr
    assert not (tmp_path / "srun-was-called").exists()


def test_planned_ranks_match_what_each_task_reads():
    env = {"SLURM_JOB_ID": "12", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2"}
    ranks = planned_ranks(env)
    assert [(r["host"], r["RANK"], r["LOCAL_RANK"]) for r in ranks] == [
        ("node1", "0", "0"), ("node1", "1", "1"), ("node2", "2", "0"), ("node2", "3", "1")]


@pytest.mark.slow
def test_ranks_map_one_to_a_gpu_and_more_ranks_than_gpus_is_a_launch_error():
    """NCCL refuses two ranks on one GPU at the first collective; here every rank finds it before loading."""
    two = {"LOCAL_WORLD_SIZE": "2"}
    assert [gpu_index(DistInfo(r, r, 2), 2, "nccl", two) for r in (0, 1)] == [0, 1]
    assert gpu_index(DistInfo(3, 1, 4), 4, "nccl", two) == 1  # node 2 of 2: LOCAL_RANK picks the GPU
    for r in (0, 1):  # both ranks fail alike (rank 0 too: it would otherwise wait for rank 1 until the timeout)
        with pytest.raises(ConfigError) as err:
            gpu_index(DistInfo(r, r, 2), 1, "nccl", {**two, "CUDA_VISIBLE_DEVICES": "3"})
        assert "2 ranks on this node but 1 GPU(s) visible (CUDA_VISIBLE_DEVICES=3)" in err.value.problems[0]
        assert "dist.backend=gloo" in err.value.problems[0]
    assert [gpu_index(DistInfo(r, r, 3), 2, "gloo", {"LOCAL_SIZE": "3"}) for r in range(3)] == [0, 1, 0]
    with pytest.raises(ConfigError):  # no launcher count: LOCAL_RANK alone still says it
        gpu_index(DistInfo(1, 1, 2), 1, "nccl", {})


@pytest.mark.slow
def test_submit_local_runs_two_ranks_end_to_end(tmp_path):
    out = tmp_path / "local"
    proc = run_cli("submit", "--cluster", "local", "--tasks-per-node", "2", "--wait", "model.path=tiny-llama",
                   *JOB_ARGS, "train.max_steps=4", "train.save_steps=4", f"train.output_dir={out}")
    assert "finished" in proc.stdout
    assert json.loads((out / "checkpoint-4" / "progress.json").read_text())["world_size"] == 2
    assert (out / "adapter_model" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_all_ranks_at_the_same_step_with_a_checkpoint(tmp_path):
    """No Slurm: SIGUSR1 to rank 1 alone; both ranks agree on a step, save, and exit 128+10."""
    import psutil

    out = tmp_path / "signalled"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "qlora_dist", "train", "model.path=tiny-llama", *JOB_ARGS, "train.max_steps=100000",
           "train.save_steps=100000", f"train.output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_steps(out, 5)
    rank1 = next(c for c in psutil.Process(proc.pid).children(recursive=True)
                 if c.environ().get("RANK") == "1" and "qlora_dist" in " ".join(c.cmdline()))
    rank1.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "SIGUSR1: checkpoint saved; exiting" in output
    saved = [p for p in out.glob("checkpoint-*")]
    assert len(saved) == 1
    progress = json.loads((saved[0] / "progress.json").read_text())
    assert progress["world_size"] == 2 and progress["step"] == max(r["step"] for r in read_metrics(out))


# --------------------------------------------------------------------------------------------------
# On a real Slurm cluster

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from slurm_cluster import SlurmCluster, ensure_installed

    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except Exception as exc:  # noqa: BLE001 - report the daemons' logs with the failure
        c.stop()
        pytest.fail(f"the test cluster did not start: {exc}\n{c.logs()}")
    yield c
    c.stop()


def _sbatch(cluster, out: Path, extra: str) -> str:
    out.mkdir(parents=True)
    env = {"MODEL_PATH": "tiny-llama", "OUTPUT_DIR": str(out), "PYTHON": sys.executable,
           "QLORA_ARGS": " ".join([*JOB_ARGS, *extra.split()])}
    return cluster.run("sbatch", "--parsable", "-o", str(out / "slurm-%j.out"), str(REPO / "slurm" / "cpu-smoke.sh"),
                       cwd=REPO, env=env).stdout.strip()


def _assert_completed(cluster, job: str, out: Path) -> None:
    state = cluster.wait_job(job)
    log = "\n".join(p.read_text()[-3000:] for p in out.glob("slurm-*.out"))
    assert state == "COMPLETED", f"job {job}: {state}\n{log}"


# The preemption test's reference: 30 steps, no periodic checkpoint (only a preemption's, in the other job).
# Two sequence-parallel groups of 2 (one a node): Ulysses' all-to-alls within a node, data parallelism across
# nodes, preempted and requeued like any job (the submitit job below runs without sequence parallelism).
PREEMPT_STEPS = "train.max_steps=30 train.save_steps=1000 dist.sequence_parallel=2"


@pytest.fixture(scope="module")
def uninterrupted_job(cluster, tmp_path_factory) -> Path:
    """One 2-node x 2-rank sbatch job run to its end: the smoke test's subject and the preemption's reference."""
    out = tmp_path_factory.mktemp("sbatch") / "uninterrupted"
    _assert_completed(cluster, _sbatch(cluster, out, PREEMPT_STEPS), out)
    return out


@pytest.mark.slow
def test_sbatch_cpu_smoke_trains_on_two_nodes(uninterrupted_job):
    progress = json.loads((uninterrupted_job / "checkpoint-30" / "progress.json").read_text())
    assert progress["world_size"] == 4 and progress["zero_stage"] == 2 and progress["sequence_parallel"] == 2
    assert len(load_adapter_tensors(uninterrupted_job / "adapter_model")) == 28


@pytest.mark.slow
def test_sbatch_stops_at_the_preflight_before_srun(cluster, tmp_path):
    """A bad model path fails the job on the batch host in seconds, one line, before any rank starts."""
    out = tmp_path / "bad"
    out.mkdir()
    env = {"MODEL_PATH": str(tmp_path / "no-model"), "OUTPUT_DIR": str(out), "PYTHON": sys.executable,
           "QLORA_ARGS": " ".join(JOB_ARGS)}
    job = cluster.run("sbatch", "--parsable", "-o", str(out / "slurm-%j.out"), str(REPO / "slurm" / "cpu-smoke.sh"),
                      cwd=REPO, env=env).stdout.strip()
    state = cluster.wait_job(job)
    log = "\n".join(p.read_text() for p in out.glob("slurm-*.out"))
    assert state == "FAILED", f"job {job}: {state}\n{log}"
    assert f"qlora-dist: error: model.path: model folder not found: {tmp_path / 'no-model'}" in log, log
    assert "Traceback" not in log and "run plan" not in log  # srun never started a rank


@pytest.mark.slow
def test_submitit_launcher_on_slurm(cluster, tmp_path):
    out = tmp_path / "submitit"
    proc = run_cli("submit", "--cluster", "slurm", "--nodes", "2", "--tasks-per-node", "2", "--timeout-min", "20",
                   "--wait", "model.path=tiny-llama", *JOB_ARGS, "train.max_steps=6", "train.save_steps=3",
                   f"train.output_dir={out}", env={"SLURM_CONF": str(cluster.conf)})
    assert "finished" in proc.stdout
    assert json.loads((out / "checkpoint-6" / "progress.json").read_text())["world_size"] == 4
    assert len(load_adapter_tensors(out / "adapter_model")) == 28


@pytest.mark.slow
def test_preempted_job_resumes_after_requeue_and_ends_as_if_uninterrupted(cluster, uninterrupted_job, tmp_path):
    full = uninterrupted_job
    out = tmp_path / "preempted"
    job = _sbatch(cluster, out, PREEMPT_STEPS)
    _wait_for_steps(out, 5)  # 25 steps before the end: room for the signal's way through Slurm
    cluster.run("scancel", "--signal=USR1", job)  # what --signal=USR1@60 does before the time limit
    deadline = time.time() + 120
    while cluster.job_state(job) != "PENDING" and time.time() < deadline:
        time.sleep(0.5)
    assert any(out.glob("checkpoint-*")), "no checkpoint was saved on SIGUSR1"
    # Slurm holds a requeued job for ~2 minutes (its requeue delay); start it now to keep the test short.
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    _assert_completed(cluster, job, out)

    log = "\n".join(p.read_text() for p in out.glob("slurm-*.out"))
    assert "SIGUSR1: checkpoint saved; requeueing Slurm job" in log and "resuming from" in log
    a, b = load_adapter_tensors(full / "adapter_model"), load_adapter_tensors(out / "adapter_model")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: data position, RNG, optimizer all carried over
    assert [r["loss"] for r in read_metrics(out) if "loss" in r] == [r["loss"] for r in read_metrics(full) if "loss" in r]
