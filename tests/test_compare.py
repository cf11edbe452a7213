"""`qlora-dist compare GRID.yaml` (issue 26, item 4): a grid of methods x seeds, trained one cell after another
with the real CLI, resumable across invocations; a table of mean and min-max over the seeds, and its
refusals before anything trains."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, run_cli
from qlora_dist.errors import ConfigError
from qlora_dist.launch import compare


def _grid(tmp_path: Path, methods: dict, **extra) -> Path:
    common = dict(k.split("=", 1) for k in TINY if not k.startswith("train.seed="))
    common |= {"train.max_steps": 3, "train.save_steps": 3, "train.global_batch_size": 4, "train.micro_batch_size": 4}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "seeds": [1, 2], "common": common,
                                    "methods": methods, **extra}))
    return path


def test_bad_grids_are_refused_naming_the_file_and_key(tmp_path):
    path = _grid(tmp_path, {"a": {"lora.r": 4}, "b": {"train.max_steps": 9, "lora.rr": 2}}, sedes=[1])
    with pytest.raises(ConfigError) as err:
        compare.read_grid(path)
    text = "\n".join(err.value.problems)
    assert f"{path}: unknown key 'sedes'" in text
    assert f"{path}: methods.b: sets train.max_steps, which every method must share" in text
    # the config keys of every method are checked too (a typo fails now, not after the first cells trained)
    path = _grid(tmp_path, {"a": {"lora.r": 4}, "b": {"lora.rr": 2}})
    with pytest.raises(ConfigError) as err:
        compare.read_grid(path)
    assert any(p.startswith(f"{path}: methods.b: ") and "lora.rr" in p for p in err.value.problems), err.value.problems
    with pytest.raises(ConfigError, match=r"baseline: 'c' is not one of the methods \(a, b\)"):
        compare.read_grid(_grid(tmp_path, {"a": {"lora.r": 4}, "b": {"lora.r": 8}}, baseline="c"))
    (tmp_path / "broken.yaml").write_text("methods: {a: [1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: not valid YAML"):
        compare.read_grid(tmp_path / "broken.yaml")


def test_the_cli_refuses_before_training(tmp_path):
    path = _grid(tmp_path, {"a": {"lora.r": 4}})
    proc = run_cli("compare", str(path), "--only", "zzz", check=False)
    assert proc.returncode == 2 and "--only: zzz not among" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_grid_trains_each_cell_once_across_invocations_and_tabulates_the_seeds(tmp_path):
    path = _grid(tmp_path, {"r4": {"lora.r": 4}, "r8-fp4": {"quantization.quant_type": "fp4"}})
    out = tmp_path / "out"
    first = run_cli("compare", str(path), "--only", "r4", timeout=600)
    assert "4 cells (2 methods x 2 seeds), 0 already completed, 2 to train" in first.stderr
    assert sorted(p.parent.name + "/" + p.name for p in out.glob("*/seed-*")) == ["r4/seed-1", "r4/seed-2"]
    assert "| r8-fp4 | 0/2 |" in first.stdout  # not trained yet: in the table, without figures
    trained_at = {p: p.stat().st_mtime_ns for p in out.glob("r4/seed-*/metrics.jsonl")}

    second = run_cli("compare", str(path), timeout=600)
    assert "2 already completed, 2 to train" in second.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("r4/seed-*/metrics.jsonl")} == trained_at  # not rerun
    summary = json.loads((out / "compare.json").read_text())
    for method in ("r4", "r8-fp4"):
        row = summary[method]
        assert row["seeds"] == [1, 2]
        for key in ("train_loss", "tokens_per_s", "peak_gb", "saved_mb"):
            stats = row[key]
            assert stats["min"] <= stats["mean"] <= stats["max"] and math.isfinite(stats["mean"]), (method, key)
        # the two seeds draw different LoRA starts and batches: their losses differ
        assert row["train_loss"]["min"] < row["train_loss"]["max"]
    # r=4 saves half the LoRA weights of r=8
    assert summary["r4"]["saved_mb"]["mean"] < summary["r8-fp4"]["saved_mb"]["mean"]
    for seed in (1, 2):
        saved = yaml.safe_load((out / "r4" / f"seed-{seed}" / "checkpoint-3" / "config.yaml").read_text())
        assert saved["train"]["seed"] == seed and saved["lora"]["r"] == 4
    assert (out / "compare.png").stat().st_size > 10_000
    assert "| r4 | 2/2 |" in (out / "compare.md").read_text()

    third = run_cli("compare", str(path), "--table", timeout=120)
    assert "to train" not in third.stderr and third.stdout == second.stdout  # nothing trained, same table
    # each row's step time over the baseline's (the first method) of the same seed
    assert "step time vs r4" in third.stdout
    assert summary["r4"]["step_time_ratio"] == {"mean": 1.0, "min": 1.0, "max": 1.0}
    assert math.isfinite(summary["r8-fp4"]["step_time_ratio"]["mean"])

    # the grid file edited after its cells completed: an error naming each cell and key, not a mixed table
    path.write_text(path.read_text().replace("lora.r: 4", "lora.r: 5"))
    stale = run_cli("compare", str(path), "--table", check=False, timeout=120)
    assert stale.returncode == 2 and "Traceback" not in stale.stderr
    for seed in (1, 2):
        assert f"methods.r4, seed {seed}: {out / 'r4' / f'seed-{seed}'} was trained with another configuration " \
               "(lora.r: checkpoint has 4, this run has 5)" in stale.stderr
    assert "methods.r8-fp4" not in stale.stderr


@pytest.mark.slow
def test_a_stop_signal_reaches_the_training_cell_and_the_next_invocation_finishes_it(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    path = _grid(tmp_path, {"r4": {"lora.r": 4}}, seeds=[1])
    text = path.read_text().replace("train.max_steps: 3", "train.max_steps: 400").replace("train.save_steps: 3",
                                                                                          "train.save_steps: 400")
    path.write_text(text)
    cell = tmp_path / "out" / "r4" / "seed-1"
    proc = subprocess.Popen([sys.executable, "-m", "qlora_dist", "compare", str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            (cell / "metrics.jsonl").is_file() and '"loss"' in (cell / "metrics.jsonl").read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # to compare alone, as a scheduler's kill of the job step would
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    saved = sorted(cell.glob("checkpoint-*"))
    assert saved and not (cell / "completed").exists()  # the cell saved where it stopped, and is not done
    stopped_at = int(saved[-1].name.split("-")[1])
    assert 0 < stopped_at < 400
    text = path.read_text().replace("train.max_steps: 400", f"train.max_steps: {stopped_at + 2}")
    path.write_text(text)
    # the same grid with 2 more steps (a user who cut it short): the cell resumes, it does not start over
    again = run_cli("compare", str(path), timeout=600)
    assert "0 already completed, 1 to train" in again.stderr and f"resuming from {saved[-1]}" in again.stderr
    assert (cell / "completed").is_file()


def test_the_shipped_paper_grid_is_valid_and_shares_everything_but_the_method():
    grid = compare.read_grid(REPO / "compare" / "paper.yaml")  # every cell's config parsed as `train` would
    assert grid.methods == ["full-bf16", "lora-bf16", "lora-bf16-attention", "qlora-nf4-dq", "qlora-nf4",
                            "qlora-fp4", "qlora-int8"]
    assert grid.seeds == (1, 2, 3) and len(grid.cells) == 21
