from pathlib import Path

import pytest

from qlora_dist import recipe
from qlora_dist.config import config_from_dict, load_config
from qlora_dist.errors import ConfigError


def test_defaults_are_the_recipe():
    cfg = load_config()
    assert (cfg.lora.r, cfg.lora.alpha) == (64, 16)
    assert cfg.optim.beta2 == 0.999 and cfg.optim.max_grad_norm == 0.3 and cfg.optim.scheduler == "constant"
    assert cfg.optim.name == "paged_adamw_32bit"
    assert (cfg.quantization.bits, cfg.quantization.quant_type, cfg.quantization.double_quant) == (4, "nf4", True)
    assert cfg.model.compute_dtype == "auto" and cfg.model.gradient_checkpointing  # bf16 on CUDA: test_precision


@pytest.mark.parametrize("name,batch,lr,steps,src,tgt,dropout", [
    ("7b-all", 16, 2e-4, 10000, 384, 128, 0.1),
    ("13b-oasst1", 16, 2e-4, 1875, 384, 512, 0.1),  # no source length in the table: the default stays
    ("33b-hh-rlhf", 32, 1e-4, 5000, 384, 768, 0.05),
    ("65b-all", 64, 1e-4, 2500, 384, 128, 0.05),
    ("65b-longform", 32, 1e-4, 2343, 512, 1024, 0.05),
])
def test_paper_presets(name, batch, lr, steps, src, tgt, dropout):
    values = recipe.PRESETS[name]
    assert values["train.global_batch_size"] == batch and values["optim.lr"] == lr
    assert values["train.max_steps"] == steps and values["data.target_max_len"] == tgt
    assert values["lora.dropout"] == dropout and values["lora.r"] == 64 and values["lora.alpha"] == 16
    assert values.get("data.source_max_len", 384) == src
    assert len([p for p in recipe.PRESETS if p != "demo"]) == 16


def test_paper_preset_needs_a_model_folder():
    with pytest.raises(ConfigError, match="model.path: required"):
        load_config(preset="7b-all")
    cfg = load_config(preset="7b-all", overrides=["model.path=/models/llama-7b"])
    assert cfg.train.global_batch_size == 16 and cfg.preset == "7b-all"


def test_precedence_preset_then_yaml_then_overrides(tmp_path: Path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  max_steps: 7\n  seed: 3\nlora:\n  r: 8\n")
    cfg = load_config(f, "demo", ["train.seed=11", "optim.lr=2e-4"])
    assert cfg.train.max_steps == 7  # YAML over preset
    assert cfg.train.seed == 11  # override over YAML
    assert cfg.optim.lr == 2e-4  # '2e-4' is a string to YAML 1.1: still a float here
    assert cfg.lora.r == 8 and cfg.lora.alpha == 32  # YAML over preset; untouched preset value stays


def test_all_problems_reported_at_once_with_their_keys():
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["lora.r=-1", "optim.lr=0", "lora.dropout=1.5", "optim.scheduler=step"])
    text = str(exc.value)
    assert len(exc.value.problems) == 4
    for key in ("lora.r", "optim.lr", "lora.dropout", "optim.scheduler"):
        assert key in text
    assert "constant, linear, cosine" in text  # the allowed values are named


def test_unknown_keys_and_groups_are_named_with_a_suggestion():
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["train.max_step=5", "trian.seed=1", "oops"])
    problems = exc.value.problems
    assert any("unknown key 'train.max_step'" in p and "train.max_steps" in p for p in problems)
    assert any("unknown group 'trian'" in p and "'train'" in p for p in problems)
    assert any("expected key=value" in p for p in problems)


def test_type_errors_name_the_expected_type():
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["train.max_steps=many", "model.gradient_checkpointing=maybe"])
    text = str(exc.value)
    assert "train.max_steps: expected an integer" in text
    assert "model.gradient_checkpointing: expected true, false or offload, got 'maybe'" in text


def test_yaml_errors_name_file_and_line(tmp_path: Path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  seed: 1\n  max_stepz: 3\nlora:\n  r: abc\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    text = str(exc.value)
    assert f"{f}:3: unknown key 'train.max_stepz'" in text
    assert f"{f}:5: lora.r: expected an integer" in text
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="did you mean '7b-all'"):
        load_config(preset="7b-al")


def test_grad_accum_keeps_the_global_batch():
    cfg = load_config(overrides=["train.global_batch_size=16", "train.micro_batch_size=2"])
    assert [cfg.train.grad_accum(w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ConfigError, match="not divisible"):
        cfg.train.grad_accum(3)


def test_saved_config_round_trips():
    cfg = load_config(preset="demo", overrides=["train.seed=5"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


def test_ds_config_choice_is_validated():
    from qlora_dist import preflight

    problems = preflight.run(load_config(overrides=["dist.ds_config=zero9"]), 1).problems
    assert any(p.startswith("dist.ds_config: unknown 'zero9'") for p in problems), problems
    assert load_config(overrides=["dist.ds_config=zero3"]).dist.ds_config == "zero3"


def test_lora_variant_and_rslora_are_typed_with_defaults():
    cfg = load_config()
    assert (cfg.lora.variant, cfg.lora.rslora) == ("lora", False)  # presets and defaults: plain LoRA
    cfg = load_config(overrides=["lora.variant=dora", "lora.rslora=true"])
    assert (cfg.lora.variant, cfg.lora.rslora) == ("dora", True)
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["lora.variant=pissa", "lora.rslora=maybe"])
    text = "\n".join(err.value.problems)
    assert "lora.variant" in text and "lora, dora" in text and "lora.rslora" in text


def test_resume_keeps_the_variant_and_old_checkpoints_are_plain_lora():
    from qlora_dist.config import flat
    from qlora_dist.train.checkpoint import config_differences

    saved = load_config().to_dict()
    assert config_differences(saved, load_config(overrides=["lora.variant=dora"])) == [
        "lora.variant: checkpoint has 'lora', this run has 'dora'"]
    before_the_keys = {k: v for k, v in flat(saved).items() if k not in ("lora.variant", "lora.rslora")}
    assert config_differences(before_the_keys, load_config()) == []  # saved before the keys: lora, no rsLoRA
    assert config_differences(before_the_keys, load_config(overrides=["lora.rslora=true"])) == [
        "lora.rslora: checkpoint has False, this run has True"]


def test_lora_init_is_typed_checked_and_kept_on_resume():
    from qlora_dist.config import flat
    from qlora_dist.train.checkpoint import config_differences

    cfg = load_config()
    assert (cfg.lora.init, cfg.lora.init_iters) == ("default", 1)  # presets and defaults: peft's own start
    assert load_config(overrides=["lora.init=loftq", "lora.init_iters=5"]).lora.init_iters == 5
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["lora.init=olora", "lora.init_iters=0"])
    assert [p.split(":")[0] for p in err.value.problems] == ["lora.init", "lora.init_iters"], err.value.problems
    saved = {k: v for k, v in flat(load_config().to_dict()).items() if not k.startswith("lora.init")}
    assert config_differences(saved, load_config(overrides=["lora.init=pissa"])) == [
        "lora.init: checkpoint has 'default', this run has 'pissa'"]  # a checkpoint from before the key


def test_check_refuses_a_start_that_cannot_work_naming_the_keys():
    from qlora_dist import preflight

    cfg = load_config(overrides=["model.path=tiny-llama", "lora.init=loftq", "quantization.bits=16",
                                 "model.loader=hf", "lora.variant=dora", "lora.r=64"])
    problems = preflight.run(cfg, 1, for_train=False).problems
    for start in ("lora.init=loftq with quantization.bits=16", "lora.init=loftq with model.loader=hf",
                  "lora.init=loftq with lora.variant=dora", "lora.r=64 with lora.init=loftq"):
        assert [p for p in problems if p.startswith(start)], (start, problems)
    problems = preflight.run(load_config(overrides=["model.path=tiny-llama", "lora.init_iters=3"]), 1,
                             for_train=False).problems
    assert [p for p in problems if p.startswith("lora.init_iters: only lora.init=loftq")], problems


def test_train_method_and_the_bits_16_alias():
    from qlora_dist.config import parse_config

    assert load_config().train.method == "qlora"
    for overrides in (["quantization.bits=16"], ["train.method=lora"]):  # the old name resolves to the new
        cfg = load_config(overrides=overrides)
        assert (cfg.train.method, cfg.quantization.bits) == ("lora", 16)
    assert load_config(overrides=["train.method=full"]).quantization.bits == 16  # no quantized base
    _, errs = parse_config(overrides=["train.method=qlora", "quantization.bits=16"])
    assert errs == ["train.method (override 'train.method=qlora'): qlora quantizes the base, but quantization.bits "
                    "(override 'quantization.bits=16') is 16; use train.method=lora for LoRA on a 16-bit base"]


def test_full_with_lora_quantization_or_init_adapter_keys_is_one_line_naming_them(tmp_path: Path):
    from qlora_dist.config import parse_config

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("train:\n  method: full\nlora:\n  r: 8\n")
    _, errs = parse_config(yaml_file, None, ["quantization.double_quant=false", "train.init_adapter=runs/a"])
    assert errs == [f"train.method: full trains every weight in 16 bits, but lora.r ({yaml_file}:4), "
                    "quantization.double_quant (override 'quantization.double_quant=false'), train.init_adapter "
                    "(override 'train.init_adapter=runs/a') configure LoRA or quantization; remove them, or use "
                    "train.method=lora or qlora"]
    # a preset's lora.* and quantization.* values are not the user's: full runs with them set
    cfg, errs = parse_config(None, "7b-all", ["train.method=full", "model.path=tiny-llama"])
    assert not errs and cfg.train.method == "full"


def test_checkpoints_saved_before_train_method_resume_as_their_method():
    from qlora_dist.train.checkpoint import config_differences

    for bits, overrides in ((4, []), (16, ["quantization.bits=16"])):
        saved = load_config(overrides=overrides).to_dict()
        del saved["train"]["method"]
        assert saved["quantization"]["bits"] == bits
        assert config_differences(saved, load_config(overrides=overrides)) == []
