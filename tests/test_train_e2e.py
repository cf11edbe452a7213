"""End to end: the real CLI in fresh processes on the tiny random LLaMA (NF4 base, DeepSpeed ZeRO-2)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, TINY_RUN_ARGS, load_adapter_tensors, read_metrics, run_cli

pytestmark = pytest.mark.slow


def test_train_writes_checkpoints_metrics_and_learns(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    run_cli("train", *TINY, "train.max_steps=24", "train.save_steps=8", "checkpoint.keep_last=2",
            "eval.at_end=true", f"train.output_dir={out}")
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses  # it learned something
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-24"]  # keep_last=2
    ckpt = out / "checkpoint-24"
    assert {p.name for p in ckpt.iterdir()} >= {"adapter_model", "engine", "rng", "config.yaml", "run_plan.json",
                                                "progress.json"}
    plan = json.loads((ckpt / "run_plan.json").read_text())
    assert plan["micro_batch_size"] == 4 and plan["grad_accum"] == 2 and plan["compute_dtype"] in ("bfloat16", "float32")
    assert read_metrics(out)[0]["event"] == "plan" and read_metrics(out)[0]["compute_dtype"] == plan["compute_dtype"]
    progress = json.loads((ckpt / "progress.json").read_text())
    assert progress["step"] == 24 and progress["samples_seen"] == 24 * 8
    assert "train:\n  output_dir:" in (ckpt / "config.yaml").read_text().replace(str(out), "")  # resolved config
    adapter_cfg = json.loads((ckpt / "adapter_model" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 16 and adapter_cfg["peft_type"] == "LORA"
    assert sorted(adapter_cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    tensors = load_adapter_tensors(ckpt / "adapter_model")
    assert len(tensors) == 2 * 7 * 2 and all(t.numel() > 0 for t in tensors.values())
    assert (out / "adapter_model" / "adapter_model.safetensors").read_bytes() == \
        (ckpt / "adapter_model" / "adapter_model.safetensors").read_bytes()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "completed").read_text())["step"] == 24
    record = read_metrics(out)[1]
    assert record["tokens_per_s"] > 0 and record["rss_peak_gb"] > 0 and record["lr"] == 3e-3
    assert record["tokens_per_s_per_gpu"] > 0 and record["mfu"] is None and "no peak for CPU" in record["mfu_peak"]
    assert record["paged_optimizer_gb"] == 0.0  # bitsandbytes pages only into CUDA unified memory
    assert any(r.get("event") == "eval" for r in read_metrics(out))

    again = run_cli("train", *TINY, "train.max_steps=24", "train.save_steps=8", "checkpoint.keep_last=2",
                    "eval.at_end=true", f"train.output_dir={out}")
    assert "already completed 24 steps" in again.stderr


# --------------------------------------------------------------------------------------------------
# Exact resume

RESUME_ARGS = [*TINY, "train.max_steps=15", "train.save_steps=5", "checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_cli("train", *RESUME_ARGS, f"train.output_dir={out}")
    return out


def _popen_train(out: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qlora_dist", "train", *RESUME_ARGS, f"train.output_dir={out}"],
                            cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _last_logged_step(out: Path) -> int:
    try:
        return max((r.get("step", 0) for r in read_metrics(out)), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _assert_same_adapter(a: Path, b: Path, atol: float = 0.0) -> None:
    ta, tb = load_adapter_tensors(a), load_adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        diff = (ta[name] - tb[name]).abs().max().item()
        assert diff <= atol, f"{name} differs: max {diff}"


def test_sigkill_between_checkpoints_then_same_command_resumes_exactly(tmp_path, uninterrupted):
    out = tmp_path / "killed"
    proc = _popen_train(out)
    deadline = time.time() + 300
    while _last_logged_step(out) < 7 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = _last_logged_step(out)
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved and killed_at > saved[-1] and saved[-1] < 15, (killed_at, saved)  # work was lost

    resumed = run_cli("train", *RESUME_ARGS, f"train.output_dir={out}")
    assert f"resuming from {out / f'checkpoint-{saved[-1]}'}" in resumed.stderr
    # Bitwise: same data position, RNG (dropout), fp32 masters, Adam moments and LR schedule.
    _assert_same_adapter(uninterrupted / "adapter_model", out / "adapter_model")
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 16))  # the lost steps' records were dropped
    assert [r["loss"] for r in steps] == [r["loss"] for r in read_metrics(uninterrupted) if "loss" in r]


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, uninterrupted):
    out = tmp_path / "crashed"
    proc = _popen_train(out, env={"QLORA_DIST_TEST_CRASH_IN_SAVE_AT_STEP": "10"})
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
    assert (out / ".tmp-checkpoint-10" / "engine").is_dir()  # the half-written save is there...
    assert not (out / "checkpoint-10").exists()  # ...but was never taken for a checkpoint
    assert json.loads((out / "checkpoint-5" / "progress.json").read_text())["step"] == 5
    assert len(load_adapter_tensors(out / "checkpoint-5" / "adapter_model")) == 28

    resumed = run_cli("train", *RESUME_ARGS, f"train.output_dir={out}")
    assert "removing .tmp-checkpoint-10" in resumed.stderr
    assert f"resuming from {out / 'checkpoint-5'}" in resumed.stderr
    assert not (out / ".tmp-checkpoint-10").exists()
    _assert_same_adapter(uninterrupted / "adapter_model", out / "adapter_model")


def test_init_adapter_starts_from_its_weights(tmp_path, uninterrupted):
    """train.init_adapter loads a PEFT adapter (weights only, fresh optimizer); the lora.* keys not set
    take its values, and the saved config says so."""
    out = tmp_path / "from_adapter"
    # One step at a negligible LR: the LoRA weights cannot move, so they must equal the adapter's.
    args = [a for a in TINY if not a.startswith("lora.r=")]  # r not set: taken from the adapter
    run_cli("train", *args, "train.max_steps=1", "train.save_steps=1", "optim.lr=1e-12",
            f"train.init_adapter={uninterrupted / 'adapter_model'}", f"train.output_dir={out}")
    # In fp32 (`auto` on a CPU without native bf16) that one step moves them by ~lr; bf16 rounds it away.
    _assert_same_adapter(uninterrupted / "adapter_model", out / "adapter_model", atol=1e-10)
    saved = yaml.safe_load((out / "checkpoint-1" / "config.yaml").read_text())
    assert saved["lora"]["r"] == 8 and len(saved["lora"]["target_modules"]) == 7
    # It starts where the adapter ended: its first loss is the uninterrupted run's level, not the initial one.
    losses = lambda run: [r["loss"] for r in read_metrics(run) if "loss" in r]  # noqa: E731
    first_fresh, last_trained, started = losses(uninterrupted)[0], losses(uninterrupted)[-1], losses(out)[0]
    assert abs(started - last_trained) < abs(started - first_fresh)


# --------------------------------------------------------------------------------------------------
# Errors: short, naming the problem, exit code 2, nothing on disk touched

def test_bad_values_and_unknown_keys(tmp_path):
    proc = run_cli("train", "lora.r=-1", "optim.lr=abc", "train.max_step=5", check=False)
    assert proc.returncode == 2
    for text in ("lora.r: must be a positive integer", "optim.lr: expected a finite number", "unknown key 'train.max_step'"):
        assert text in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_model_folder(tmp_path):
    proc = run_cli("train", f"model.path={tmp_path / 'no-such-model'}", f"train.output_dir={tmp_path / 'o'}",
                   check=False)
    assert proc.returncode == 2 and "model folder not found" in proc.stderr and "Traceback" not in proc.stderr


def test_output_folder_of_a_different_configuration(tmp_path, tiny_run):
    out = tmp_path / "run"  # a copy of the suite's tiny run (4 steps, checkpoints 2 and 4)
    shutil.copytree(tiny_run[0], out, ignore=shutil.ignore_patterns(".lock"))
    same = [*TINY_RUN_ARGS, f"data.dataset={tiny_run[1]}", f"train.output_dir={out}"]
    before = (out / "checkpoint-4" / "adapter_model" / "adapter_model.safetensors").read_bytes()
    proc = run_cli("train", *same, "lora.r=4", "optim.lr=1e-3", "train.max_steps=6", check=False)
    assert proc.returncode == 2
    assert "holds checkpoint-4 of a different configuration" in proc.stderr
    assert "lora.r: checkpoint has 8, this run has 4" in proc.stderr
    assert "optim.lr: checkpoint has 0.003, this run has 0.001" in proc.stderr
    assert (out / "checkpoint-4" / "adapter_model" / "adapter_model.safetensors").read_bytes() == before
    # Changing only how long to train is a continuation, not a different configuration.
    run_cli("train", *same, "train.max_steps=5")
    assert json.loads((out / "completed").read_text())["step"] == 5
