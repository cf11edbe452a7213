"""A NaN/inf loss never reaches the weights (issue 13, item 2; red-team N2: optim.lr=1e30
optim.max_grad_norm=0 gave NaN from step 2, a NaN checkpoint at every save, exit 0 and `completed`).

One run of the real CLI (LR warm-up of one step, so that there is an LR schedule to check): the huge
updates make the loss NaN a few steps in (step 4 here). That first NaN step is skipped as DeepSpeed skips an
fp16 overflow (weights, optimizer moments and LR schedule stay, the data position moves on); the next is one
skip more than train.max_nonfinite_steps=1 allows: exit 3 naming the step and the last good checkpoint, no
checkpoint after it, no `completed`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, read_metrics, run_cli

N2 = [*TINY, "model.compute_dtype=float32", "optim.lr=1e30", "optim.max_grad_norm=0",
      "optim.scheduler=linear", "optim.warmup_steps=1", "train.max_steps=6", "train.save_steps=1", "checkpoint.keep_last=0",
      "train.max_nonfinite_steps=1"]


def _tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a (nested) checkpoint object, by its path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


def _checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.rglob("*.pt")):
        found |= _tensors(torch.load(path, map_location="cpu", weights_only=False), path.name)
    for path in sorted(folder.rglob("*.safetensors")):
        found |= {f"{path.relative_to(folder)}/{k}": v for k, v in load_file(str(path)).items()}
    return found


@pytest.fixture(scope="module")
def n2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("n2") / "run"
    proc = run_cli("train", *N2, f"train.output_dir={out}", check=False, timeout=120)
    skipped = [r for r in read_metrics(out) if r.get("event") == "nonfinite"]
    return out, proc, skipped


def _first_skip(skipped: list[dict]) -> int:
    assert skipped and 1 < skipped[0]["step"] < 6, skipped
    return skipped[0]["step"]


@pytest.mark.slow
def test_nan_loss_stops_the_run_with_a_message_and_no_nan_checkpoint(n2_run):
    out, proc, skipped = n2_run
    assert proc.returncode == 3, proc.stderr[-3000:]
    first = _first_skip(skipped)
    message = proc.stderr.strip().splitlines()[-1]
    assert f"step {first + 1}:" in message and f"last good checkpoint: {out / f'checkpoint-{first}'}" in message
    assert not (out / "completed").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, first + 1)]
    for step in range(1, first + 1):
        tensors = _checkpoint(out / f"checkpoint-{step}")
        assert not [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()], step
    assert [(r["step"], r["skipped"], r["nonfinite_losses"] > 0) for r in skipped] == [(first, 1, True),
                                                                                      (first + 1, 2, True)]
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, first))  # no NaN loss record
    # before any NaN, the exploding weights drew a warning (red-team N1: lr=1e6 ran silently)
    warned = [r["step"] for r in read_metrics(out) if r.get("event") == "warning"]
    assert len(warned) == 1 and warned[0] < first, (warned, first)
    assert "the LoRA weights' norm grew" in proc.stderr


@pytest.mark.slow
def test_the_count_of_skipped_steps_survives_a_requeue(n2_run, tmp_path):
    """The skipped step is in the checkpoint's progress record; the same command run again (a requeue)
    resumes there with that count, so one more NaN step is past the limit at once."""
    import json
    import shutil

    out, _, skipped = n2_run
    first = _first_skip(skipped)
    counts = [json.loads((out / f"checkpoint-{s}" / "progress.json").read_text())["nonfinite_steps"]
              for s in (first - 1, first)]
    assert counts == [0, 1]
    again = tmp_path / "run"
    shutil.copytree(out, again)
    proc = run_cli("train", *N2, f"train.output_dir={again}", check=False, timeout=120)
    assert proc.returncode == 3 and f"step {first + 1}: 2 steps with a NaN/inf" in proc.stderr, proc.stderr[-2000:]
    assert [r["skipped"] for r in read_metrics(again) if r.get("event") == "nonfinite"] == [1, 2]


@pytest.mark.slow
def test_a_skipped_step_changes_no_weight_optimizer_or_schedule_state(n2_run):
    out, _, skipped = n2_run
    steps = (_first_skip(skipped) - 1, _first_skip(skipped))  # before and after the skipped step
    before, after = (_checkpoint(out / f"checkpoint-{s}") for s in steps)
    weights = [k for k in before if not k.startswith("rng/")]  # the RNG state moves on with the data
    assert before.keys() == after.keys() and len(weights) > 10
    assert any("fp32_groups" in k for k in weights) and any(k.endswith("/state2") for k in weights)  # masters, moments
    assert not [k for k in weights if not torch.equal(before[k], after[k])]
    states = [torch.load(out / f"checkpoint-{s}" / "engine" / "mp_rank_00_model_states.pt", weights_only=False)
              for s in steps]
    assert states[0]["lr_scheduler"] == states[1]["lr_scheduler"] and states[0]["lr_scheduler"]
    assert (states[0]["skipped_steps"], states[1]["skipped_steps"]) == (0, 1)
    progress = [json.loads((out / f"checkpoint-{s}" / "progress.json").read_text()) for s in steps]
    assert [p["step"] for p in progress] == list(steps)  # the data position moved on
    assert progress[1]["samples_seen"] == progress[0]["samples_seen"] + 8
