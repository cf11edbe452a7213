"""The starting adapter (`train.init_adapter`): checked, not trusted.

Its adapter_config.json decides the LoRA the model gets (PeftModel.from_pretrained builds it), and its
qlora_dist.json how it started (lora.init: a LoftQ / PiSSA adapter's base is rebuilt with it). So the
lora.* keys the user set (YAML or key=value; defaults and presets do not count) must agree with it — a
difference is an error listing each key — and the keys the user did not set take the adapter's values,
so the saved config says what was trained (an r=8 q/v adapter no longer trains under a config that says
r=64 on every linear layer).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from qlora_dist.config import TARGET_PRESET_NAMES, Config
from qlora_dist.errors import ConfigError
from qlora_dist.model import adapter_settings, folder

# adapter_config.json key -> our key
LORA_KEYS = {"r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
             "target_modules": "lora.target_modules", "use_dora": "lora.variant", "use_rslora": "lora.rslora"}
# What peft 0.21.2 builds when an adapter_config.json lacks the key (adapters saved before the field existed).
PEFT_DEFAULTS = {"use_dora": False, "use_rslora": False}
# qlora_dist.json key -> our key: how the adapter started, which decides its base (model/adapter_init.py)
INIT_KEYS = {"lora_init": "lora.init", "lora_init_iters": "lora.init_iters"}
# adapter_config.json init_lora_weights of an adapter without qlora_dist.json's lora_init -> lora.init
PEFT_INITS = {True: "default", False: "default", "gaussian": "gaussian"}


def recorded_init(adapter_dir: str | Path, data: dict, key: str = "train.init_adapter") -> dict:
    """{lora_init, lora_init_iters} the adapter started with: its qlora_dist.json's, else what its
    adapter_config.json's init_lora_weights means. An init that changed a base we cannot rebuild (peft's
    own loftq / pissa / olora / ..., whose residual base is another model) is a ConfigError."""
    saved = adapter_settings.read(adapter_dir) or {}
    if "lora_init" in saved:
        return {"lora_init": saved["lora_init"], "lora_init_iters": saved.get("lora_init_iters", 1)}
    peft_init = data.get("init_lora_weights", True)
    if peft_init not in PEFT_INITS:
        raise ConfigError([f"{key}: {adapter_dir}/adapter_config.json has init_lora_weights={peft_init!r} and no "
                           f"qlora_dist.json lora_init: its base was changed by that init outside qlora-dist and "
                           "cannot be rebuilt here; start from an adapter with init_lora_weights=true"])
    return {"lora_init": PEFT_INITS[peft_init], "lora_init_iters": 1}


def read(adapter_dir: str | Path, key: str = "train.init_adapter") -> dict:
    """adapter_config.json of a PEFT LoRA adapter folder; ConfigError naming what is wrong."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise ConfigError([f"{key}: adapter folder not found: {path}"])
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError([f"{key}: {path} has no adapter_config.json (not a PEFT adapter folder)"])
    try:
        data = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError([f"{key}: {config_file}: not valid JSON ({exc})"]) from None
    if not isinstance(data, dict) or data.get("peft_type", "LORA") != "LORA":
        raise ConfigError([f"{key}: {config_file}: not a LoRA adapter (peft_type {data.get('peft_type')!r})"])
    return data


def _ours(adapter_key: str, value):
    if adapter_key == "target_modules":
        return sorted(value) if isinstance(value, (list, tuple, set)) else [value]
    if adapter_key == "use_dora":  # peft records DoRA as a flag; our key names the variant
        return "dora" if value else "lora"
    if adapter_key == "use_rslora":
        return bool(value)
    return value


def _preset_names(model_path: str, preset: str) -> set[str]:
    """What a lora.target_modules preset (all-linear, attention) means for this model's family (Phi-3 has
    qkv_proj, LLaMA q/k/v): read from the model built from its config on the meta device (no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_dist.model.base import TARGET_PRESETS
    from qlora_dist.model.builtin import random_llama_config, random_size, resolve_model_path

    size = random_size(model_path)
    config = random_llama_config(size) if size else AutoConfig.from_pretrained(resolve_model_path(model_path))
    with init_empty_weights():
        return set(TARGET_PRESETS[preset](AutoModelForCausalLM.from_config(config)))


def _same(our_key: str, mine, theirs, model_path: str) -> bool:
    if our_key == "lora.target_modules":
        mine, theirs = set(mine), set(theirs)
        presets = [{name} for name in TARGET_PRESET_NAMES]
        if mine != theirs and any(p in (mine, theirs) for p in presets):
            mine, theirs = (_preset_names(model_path, next(iter(s))) if s in presets else s for s in (mine, theirs))
        return mine == theirs
    if our_key in ("lora.variant", "lora.rslora", "lora.init", "lora.init_iters"):
        return mine == theirs
    return float(mine) == float(theirs)


def problems(cfg: Config) -> list[str]:
    """Everything wrong with train.init_adapter, read without loading it: the folder, its config, the
    weight file's header, and each lora.* key the user set that the adapter contradicts."""
    if not cfg.train.init_adapter:
        return []
    if folder.fully_fine_tuned(cfg.train.init_adapter):
        return [folder.not_an_adapter(cfg.train.init_adapter, "train.init_adapter")]
    try:
        data = read(cfg.train.init_adapter)
    except ConfigError as exc:
        return exc.problems
    data = {**PEFT_DEFAULTS, **data}
    weights = Path(cfg.train.init_adapter) / "adapter_model.safetensors"
    errs = folder.safetensors_problems(weights, "train.init_adapter") if weights.is_file() else [
        f"train.init_adapter: {weights} not found (adapters are read in safetensors format)"]
    if not errs:
        q = cfg.quantization
        errs += adapter_settings.base_problems(
            cfg.train.init_adapter, cfg.model.path, "train.init_adapter", "model.allow_base_mismatch=true",
            dict(bits=q.bits, quant_type=q.quant_type, double_quant=q.double_quant), cfg.model.allow_base_mismatch)
    try:
        data.update(recorded_init(cfg.train.init_adapter, data))
    except ConfigError as exc:
        return errs + exc.problems
    for theirs, ours in {**LORA_KEYS, **INIT_KEYS}.items():
        if ours in cfg.user_keys and theirs in data:
            mine = getattr(cfg.lora, ours.split(".")[1])
            if not _same(ours, mine, _ours(theirs, data[theirs]), cfg.model.path):
                errs.append(f"{ours}: you set {mine!r} but the adapter {cfg.train.init_adapter} was trained with "
                            f"{theirs}={data[theirs]!r} ({ours}={_ours(theirs, data[theirs])!r}); drop {ours} "
                            "to take the adapter's value")
    return errs


def adopt(cfg: Config) -> Config:
    """cfg with the lora.* keys the user did not set taken from the starting adapter (a copy; cfg itself
    when there is no starting adapter). Every rank calls it; the preflight has checked the folder."""
    if not cfg.train.init_adapter:
        return cfg
    data, adopted = {**PEFT_DEFAULTS, **read(cfg.train.init_adapter)}, copy.deepcopy(cfg)
    data.update(recorded_init(cfg.train.init_adapter, data))
    for theirs, ours in {**LORA_KEYS, **INIT_KEYS}.items():
        if ours not in cfg.user_keys and theirs in data:
            setattr(adopted.lora, ours.split(".")[1], _ours(theirs, data[theirs]))
    return adopted
