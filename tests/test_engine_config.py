import json

import pytest

from qlora_dist.config import load_config
from qlora_dist.errors import ConfigError
from qlora_dist.ds_files import known_ds_configs, zero_stage
from qlora_dist.train.engine import build_ds_config


def test_shipped_ds_configs():
    assert {"zero2", "zero3", "zero3_offload"} <= set(known_ds_configs())
    cfg = load_config(overrides=["train.global_batch_size=16", "train.micro_batch_size=2"])
    assert zero_stage(build_ds_config(cfg, 1)) == 2
    cfg.dist.ds_config = "zero3_offload"
    ds = build_ds_config(cfg, 2)
    assert zero_stage(ds) == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_values_our_config_derives_are_filled():
    cfg = load_config(overrides=["train.global_batch_size=16", "train.micro_batch_size=2", "optim.max_grad_norm=0.3",
                                 "model.compute_dtype=bfloat16"])
    ds = build_ds_config(cfg, world_size=2)
    fp32 = build_ds_config(load_config(overrides=["model.compute_dtype=float32"]), world_size=1)
    assert fp32["bf16"]["enabled"] is False and fp32["fp16"]["enabled"] is False
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4  # 16 / (2 x 2 ranks)
    assert ds["train_batch_size"] == 16
    assert ds["gradient_clipping"] == 0.3
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert "scheduler" not in ds  # constant LR without warm-up: the optimizer's own LR


def test_schedules_map_to_deepspeed_schedulers():
    cfg = load_config(overrides=["optim.scheduler=linear", "optim.warmup_steps=5", "train.max_steps=50"])
    sched = build_ds_config(cfg, 1)["scheduler"]
    assert sched["type"] == "WarmupDecayLR" and sched["params"]["total_num_steps"] == 50
    assert sched["params"]["warmup_num_steps"] == 5 and sched["params"]["warmup_max_lr"] == cfg.optim.lr
    cfg.optim.scheduler = "cosine"
    assert build_ds_config(cfg, 1)["scheduler"]["type"] == "WarmupCosineLR"
    cfg.optim.scheduler = "constant"
    assert build_ds_config(cfg, 1)["scheduler"]["type"] == "WarmupLR"
    for schedule in ("linear", "cosine"):  # DeepSpeed's refuse 0 warm-up steps: said before loading
        with pytest.raises(ConfigError, match=f"optim.warmup_steps: the {schedule} schedule needs at least 1"):
            load_config(overrides=[f"optim.scheduler={schedule}", "optim.warmup_steps=0"])


def test_a_contradicting_json_value_names_both_values(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0,
                                "train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Adam"}}))
    cfg = load_config(overrides=[f"dist.ds_config={path}", "train.micro_batch_size=2"])
    with pytest.raises(ConfigError) as exc:
        build_ds_config(cfg, 1)
    text = str(exc.value)
    assert "gradient_clipping is 1.0 but our config gives 0.3" in text
    assert "train_micro_batch_size_per_gpu is 4 but our config gives 2" in text
    assert "remove 'optimizer'" in text


def test_a_broken_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2},\n  oops\n}')
    cfg = load_config(overrides=[f"dist.ds_config={path}"])
    with pytest.raises(ConfigError, match=r"broken.json:3: not valid JSON"):
        build_ds_config(cfg, 1)


def test_deepspeed_is_imported_without_mlflow_which_still_imports_afterwards():
    """compat.import_deepspeed: deepspeed 0.19.8's autotuner imports mlflow (most of deepspeed's import
    time); a rank's start skips it, and a tracker that wants mlflow still gets it."""
    import subprocess
    import sys

    code = ("import sys\nfrom qlora_dist import compat\ncompat.import_deepspeed()\n"
            "print('mlflow' in sys.modules)\nimport mlflow\nprint(sys.modules['mlflow'] is mlflow)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "True"]
