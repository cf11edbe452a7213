"""Real DeepSpeed ranks over gloo on CPU (2 and 4 processes, torchrun and the deepspeed launcher)."""
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

from conftest import REPO, TINY, free_port, load_adapter_tensors, read_metrics, run_torchrun

pytestmark = pytest.mark.slow

# Dropout off: ranks draw different dropout masks than one process does, so only then can the curves of
# different world sizes be compared. Micro batch 2, global batch 8: accumulation 4 / 2 / 1 on 1 / 2 / 4 ranks.
SAME_BATCH = [*TINY, "lora.dropout=0", "train.micro_batch_size=2", "train.global_batch_size=8"]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


def _relative_difference(a: Path, b: Path) -> float:
    ta, tb = load_adapter_tensors(a), load_adapter_tensors(b)
    num = sum(((ta[k].float() - tb[k].float()) ** 2).sum() for k in ta) ** 0.5
    return float(num / sum((ta[k].float() ** 2).sum() for k in ta) ** 0.5)


# The ZeRO runs of this file, one launch per world size (tests/workers/train_cases.py: imports, process
# group and DeepSpeed set-up paid once per launch, the cases trained one after another): 4 ranks, then 2,
# then 1 (a plain process). A resumed case starts from a copy of another case's checkpoint-5.
AGREE = ["train.max_steps=20", "train.save_steps=20"]
RESUME = ["train.max_steps=10", "train.save_steps=5", "checkpoint.keep_last=0"]
RESUME_CASES = [("zero2", 2, 1), ("zero3", 4, 2), ("zero3", 2, 2)]  # (stage, ranks before, ranks after)
AUTO = ["train.micro_batch_size=auto", "train.save_steps=2"]


def _resume_keys(stage: str, before: int, after: int) -> list[str]:
    # same world: RNG states carry over too, so dropout stays on
    return [*RESUME, f"dist.ds_config={stage}", f"lora.dropout={0.1 if before == after else 0}"]


def _case(name: str, keys: list[str]) -> str:
    return f"{name}:{','.join(keys)}"


def _stderr_by_case(stderr: str) -> dict[str, str]:
    """Each case's part of the launches' stderr; a case started twice (auto) keeps its last start."""
    from workers.train_cases import CASE_MARK

    parts = stderr.split(CASE_MARK)[1:]
    return {part.split("\n", 1)[0]: part for part in parts}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(the folder of every case, each case's stderr)."""
    out = tmp_path_factory.mktemp("ranks")
    worker = str(REPO / "tests" / "workers" / "train_cases.py")
    full = {(s, b, a): f"{s}-{b}-full" for s, b, a in RESUME_CASES}
    resumed = {(s, b, a): f"{s}-{b}to{a}" for s, b, a in RESUME_CASES}

    def launch(world: int, cases: list[str]) -> str:
        if world == 1:
            proc = subprocess.run([sys.executable, worker, str(out), *cases, "--", *SAME_BATCH], cwd=REPO,
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-4000:]
            return proc.stderr
        return run_torchrun(world, str(out), *cases, "--", *SAME_BATCH, script=worker).stderr

    def cases(world: int) -> list[str]:
        return [_case(full[c], _resume_keys(*c)) for c in RESUME_CASES if c[1] == world] + [
            _case(resumed[c], [*_resume_keys(*c), f"copy={out / full[c] / 'checkpoint-5'}"])
            for c in RESUME_CASES if c[2] == world]

    # the ZeRO-3 export case of tests/workers/zero3_export.py rides in the 4-rank launch too
    stderr = launch(4, [*cases(4), _case("z3x4", ["worker=zero3_export", "train.max_steps=6", "train.save_steps=6",
                                                   "dist.ds_config=zero3"])])
    stderr += launch(2, [_case("zero2", [*AGREE, "dist.ds_config=zero2"]),
                         _case("zero3", [*AGREE, "dist.ds_config=zero3"]), *cases(2),
                         _case("auto", [*AUTO, "train.max_steps=2", "train.max_memory_per_gpu=1GB"])])
    stderr += launch(1, [_case("one", AGREE), *cases(1),
                         _case("auto", [*AUTO, "train.max_steps=4", "train.max_memory_per_gpu=2GB"])])
    return out, _stderr_by_case(stderr)


def test_one_rank_zero2_and_zero3_agree(runs):
    out, _ = runs
    one = _losses(out / "one")
    assert len(one) == 20 and one[-1] < one[0]
    for other in ("zero2", "zero3"):
        losses = _losses(out / other)
        gap = max(abs(x - y) for x, y in zip(one, losses))
        print(f"1 rank vs 2 ranks {other}: max loss difference {gap:.3g}")
        assert gap < 1e-3, (other, one, losses)
        # bf16 weights: a few units in the last place of a 20-step drift; 1% of the adapter's norm.
        rel = _relative_difference(out / "one" / "adapter_model", out / other / "adapter_model")
        print(f"1 rank vs 2 ranks {other}: adapter relative difference {rel:.3g}")
        assert rel < 1e-2


def test_zero3_four_ranks_exports_only_lora_and_peft_reproduces_logits(runs, tiny_model_dir):
    out = runs[0] / "z3x4"
    gathered = json.loads((out / "gathered.json").read_text())
    assert gathered["world_size"] == 4 and gathered["zero_stage"] == 3
    # Saving a checkpoint gathered the LoRA weights once and not one byte of the frozen base.
    assert gathered["gathered_bytes"] == gathered["lora_bytes"] < gathered["base_bytes"]
    tensors = load_adapter_tensors(out / "adapter_model")
    assert len(tensors) == 28 and all(t.numel() > 0 and t.abs().sum() > 0 for n, t in tensors.items() if "lora_A" in n)

    from test_adapter_logits import _seed_loading_code

    from qlora_dist import compat

    saved = torch.load(out / "trained_logits.pt")
    model = _seed_loading_code(tiny_model_dir, out / "adapter_model").eval()
    compat.disable_cpu_weight_repacking(model)
    batch = saved["batch"]
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["attention_mask"].bool()
    want = saved["logits"]
    assert (got - want)[mask].abs().max() <= 0.01 * want[mask].abs().max()


@pytest.mark.parametrize("stage,before,after", RESUME_CASES)
def test_resume_on_another_world_size_is_exact(runs, stage, before, after):
    """A checkpoint of N ranks continued on M ranks ends with the same adapter as the uninterrupted
    N-rank run: the LoRA weights, fp32 masters, optimizer moments and data position all carried over."""
    out, stderr = runs
    full, resumed = out / f"{stage}-{before}-full", out / f"{stage}-{before}to{after}"
    if before != after:
        assert f"saved by {before} rank(s)" in stderr[resumed.name] and "resharding" in stderr[resumed.name]
    if before == after:
        a, b = load_adapter_tensors(full / "adapter_model"), load_adapter_tensors(resumed / "adapter_model")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert _losses(resumed) == _losses(full)[5:]
        return
    # Another world size sums the gradients in another order: fp32 rounding (bf16 weights round it away;
    # fp32 ones, `auto` on a CPU without native bf16, keep ~1e-7 of it), far below any lost state.
    assert _relative_difference(full / "adapter_model", resumed / "adapter_model") < 1e-5
    assert _losses(resumed) == pytest.approx(_losses(full)[5:], rel=1e-5)


@pytest.mark.parametrize("form", [["--module", "qlora_dist"], [str(REPO / "launcher" / "train.py")]],
                         ids=["module", "script"])
def test_deepspeed_launcher_runs_the_same_entry_point(tmp_path, form):
    out = tmp_path / "ds"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           *form, "train", *SAME_BATCH, "train.max_steps=3", "train.save_steps=3",
           f"train.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "checkpoint-3" / "progress.json").read_text())["world_size"] == 2
    assert len(_losses(out)) == 3


def test_a_killed_rank_fails_the_job_within_two_minutes(tmp_path):
    import psutil

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "qlora_dist", "train", *SAME_BATCH, "train.max_steps=100000", "train.save_steps=100000",
           f"train.output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    victim = next(c for c in psutil.Process(proc.pid).children(recursive=True)
                  if c.environ().get("RANK") == "1" and "qlora_dist" in " ".join(c.cmdline()))
    victim.send_signal(signal.SIGKILL)
    killed_at = time.time()
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job was still running 2 minutes after one of its ranks was killed")
    assert proc.returncode != 0
    assert time.time() - killed_at < 120
    assert "rank      : 1" in output and "SIGKILL" in output  # the launcher names the dead rank
    assert not _still_running(str(out))  # the other rank is gone too


def _still_running(marker: str) -> list[int]:
    import psutil

    alive = []
    for p in psutil.process_iter():
        try:
            if marker in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return alive


def test_a_run_that_used_auto_resumes_on_another_world_size_and_cap(runs):
    """`auto` stays `auto` in config.yaml; what it resolved to (micro batch, checkpointing, compute dtype)
    is the run plan beside it, resolved anew on resume: 2 ranks under a 1 GB cap, then 1 rank under 2 GB."""
    out, stderr = runs
    out = out / "auto"
    plans = [json.loads((out / f"checkpoint-{s}" / "run_plan.json").read_text()) for s in (2, 4)]
    saved = [(out / f"checkpoint-{s}" / "config.yaml").read_text() for s in (2, 4)]
    print([(p["world_size"], p["micro_batch_size"], p["grad_accum"]) for p in plans])
    assert [(p["world_size"], p["micro_batch_size"]) for p in plans] == [(2, 4), (1, 8)]
    assert all("micro_batch_size: auto" in s and "compute_dtype: auto" in s for s in saved)
    assert "saved by 2 rank(s)" in stderr["auto"] and len(_losses(out)) == 4
