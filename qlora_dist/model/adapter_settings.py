"""The run's settings that travel with an adapter, and the base loading they imply outside training.

An adapter learned to correct one particular quantized base: NF4 or FP4, with or without double
quantization. `generate`, `eval mmlu` and `merge` must load that same base, so the checkpoint writes
ADAPTER/qlora_dist.json beside the PEFT files:
    {"base_model", "bits", "quant_type", "double_quant", "compute_dtype", "prompt_template",
     "base_model_type", "base_config_sha256",   (these two since December 2026: see base_problems)
     "lora_init", "lora_init_iters"}            (since issue 27: a LoftQ / PiSSA adapter's base is rebuilt
                                                 from the original weights with them, model/adapter_init.py)
An adapter made by another tool has no such file: its base is loaded with the recipe's defaults (NF4,
double quantization). The compute dtype is not taken from the file: it is this machine's choice
(precision.resolve_compute_dtype), since the quantized weights are the same in any compute dtype.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from qlora_dist import atomic, recipe
from qlora_dist.config import INIT_METHODS
from qlora_dist.errors import ConfigError
from qlora_dist import dist
from qlora_dist.precision import DTYPES, QUANT_TYPES, resolve_compute_dtype

FILE = "qlora_dist.json"
_CHECKS = {  # key -> (is the value valid, what is allowed)
    "base_model": (lambda v: isinstance(v, str), "a string"),
    "bits": (lambda v: v in (4, 8, 16), "4, 8 or 16"),
    "quant_type": (lambda v: v in QUANT_TYPES, " or ".join(QUANT_TYPES)),
    "double_quant": (lambda v: isinstance(v, bool), "true or false"),
    "compute_dtype": (lambda v: v in DTYPES, " or ".join(DTYPES)),
    "prompt_template": (lambda v: isinstance(v, str), "a string"),
}
_OPTIONAL = {  # recorded since December 2026; older adapters load without them (what is recorded is compared)
    "base_model_type": (lambda v: isinstance(v, str), "a string"),
    "base_config_sha256": (lambda v: isinstance(v, str) and len(v) == 64, "a sha256 hex digest"),
    "lora_init": (lambda v: v in INIT_METHODS, " or ".join(INIT_METHODS)),
    "lora_init_iters": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
}


def write(adapter_dir: Path, *, base_model: str, bits: int, quant_type: str, double_quant: bool,
          compute_dtype: str, prompt_template: str = "guanaco", lora_init: str = "default",
          lora_init_iters: int = 1) -> None:
    """ADAPTER/qlora_dist.json (atomically), with the base's identity (base_identity of base_model);
    compute_dtype is the resolved one the run trained in; lora_init(_iters): the run's lora.init(_iters)."""
    settings = dict(base_model=str(base_model), bits=bits, quant_type=quant_type, double_quant=double_quant,
                    compute_dtype=compute_dtype, prompt_template=prompt_template, **base_identity(str(base_model)),
                    lora_init=lora_init, lora_init_iters=lora_init_iters)
    bad = [k for k, (ok, _) in _CHECKS.items() if not ok(settings[k])]
    if bad:  # a caller's bug (e.g. an unresolved "auto"), not a user's input
        raise ValueError(f"adapter settings: invalid {', '.join(f'{k}={settings[k]!r}' for k in bad)}")
    atomic.write_text(Path(adapter_dir) / FILE, json.dumps(settings, indent=2) + "\n")


def read(adapter_dir: Path | str) -> dict | None:
    """The settings saved with the adapter; None when it has none (e.g. made by another tool)."""
    path = Path(adapter_dir) / FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: not valid JSON ({exc})"]) from None
    if not isinstance(settings, dict):
        raise ConfigError([f"{path}: expected a JSON object with keys {', '.join(_CHECKS)}"])
    problems = [f"{path}: {k}: missing" if k not in settings else f"{path}: {k}: {settings[k]!r} is not {allowed}"
                for k, (ok, allowed) in _CHECKS.items() if k not in settings or not ok(settings[k])]
    problems += [f"{path}: {k}: {settings[k]!r} is not {allowed}"
                 for k, (ok, allowed) in _OPTIONAL.items() if k in settings and not ok(settings[k])]
    if problems:
        raise ConfigError(problems)
    return settings


@dataclass(frozen=True)
class BaseLoading:
    """How a base is loaded outside training: its quantization as trained, this machine's compute dtype."""
    bits: int
    quant_type: str
    double_quant: bool
    compute_dtype: str  # resolved: a key of precision.DTYPES
    init: object = None  # model/adapter_init.AdapterInit: a LoftQ / PiSSA base, rebuilt from the original weights

    def describe(self) -> str:
        rebuilt = f", rebuilt with the adapter's {self.init.method} start" if self.init else ""
        if self.bits == 16:
            return "16-bit" + rebuilt
        if self.bits == 8:
            return "8-bit LLM.int8"
        return (f"4-bit {self.quant_type.upper()} {'with' if self.double_quant else 'without'} double quant"
                + rebuilt)


def base_loading(adapter_dir: Path | str | None, bits: int | None = None, quant_type: str | None = None,
                 double_quant: bool | None = None, compute_dtype: str = "auto") -> BaseLoading:
    """The adapter's base settings (its qlora_dist.json, else the recipe's defaults), each overridable
    (None: not overridden), and the resolved compute dtype; logged once, on rank 0."""
    saved = read(adapter_dir) if adapter_dir else None
    source = str(Path(adapter_dir) / FILE) if saved else "the recipe's defaults"
    saved = saved or {"bits": 4, "quant_type": recipe.QUANT_TYPE, "double_quant": recipe.DOUBLE_QUANT}
    dtype, why = resolve_compute_dtype(compute_dtype)
    from qlora_dist.model import adapter_init

    loading = BaseLoading(saved["bits"] if bits is None else bits, quant_type or saved["quant_type"],
                          saved["double_quant"] if double_quant is None else double_quant, dtype,
                          adapter_init.from_adapter(adapter_dir, saved) if adapter_dir else None)
    if loading.init is not None and loading.init.method == "loftq" and loading.bits == 16:
        raise ConfigError([f"--bits 16: {adapter_dir} is a LoftQ adapter (lora_init=loftq in {source}): its base "
                           "is the 4-bit one LoftQ computed, which has no 16-bit form; load it in 4 bits"])
    overridden = ", with overrides" if (bits, quant_type, double_quant) != (None, None, None) else ""
    dist.log(f"base model: {loading.describe()} (from {source}{overridden}); compute dtype {dtype} ({why})")
    return loading


# --------------------------------------------------------------------- the base an adapter belongs to
# LoRA weights correct one base. Applied to another whose shapes happen to match (the tiny LLaMA and the
# tiny Qwen2 have the same ones) they run and report with no word. So every loader (generate, eval mmlu,
# merge, train.init_adapter, resume) asks base_problems first, before a weight is read. What an adapter
# records about its base, newest first: qlora_dist.json's base_model_type and base_config_sha256; else the
# base folder it names (its base_model, or adapter_config.json's base_model_name_or_path) when that folder
# is still here; and always its LoRA weights' shapes, against the base's safetensors headers.
# Keys of config.json that differ between saves of one and the same model (and say nothing of its function).
CONFIG_NOISE = ("transformers_version", "dtype", "torch_dtype", "_name_or_path", "quantization_config", "use_cache")
QUANT_KEYS = ("bits", "quant_type", "double_quant")


def _base_config(model_path: str | Path) -> dict | None:
    """The config.json of a model.path (a folder, a built-in already in the cache, or a random: shape),
    read without building or loading anything; None when there is none to read."""
    from qlora_dist.model import builtin, folder

    if size := builtin.random_size(model_path):
        return builtin.random_llama_config(size).to_dict()
    path = builtin.builtin_folder(str(model_path)) if builtin.is_builtin(model_path) else Path(model_path).expanduser()
    return folder.read_config(path)


def _config_sha256(config: dict) -> str:
    kept = {k: v for k, v in config.items() if k not in CONFIG_NOISE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def base_identity(model_path: str | Path) -> dict:
    """{base_model_type, base_config_sha256} of a base, as qlora_dist.json records them ({} if unreadable)."""
    config = _base_config(model_path)
    if config is None:
        return {}
    return {"base_model_type": str(config.get("model_type")), "base_config_sha256": _config_sha256(config)}


def _recorded_identity(adapter_dir: Path, saved: dict) -> tuple[dict, str]:
    """What the adapter says of its base's identity, and where it says it."""
    if "base_model_type" in saved:
        return saved, str(adapter_dir / FILE)
    try:
        named = saved.get("base_model") or json.loads((adapter_dir / "adapter_config.json").read_text()).get(
            "base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        named = None
    return (base_identity(named), f"its base {named}") if named else ({}, "")


def _shape_problem(adapter_dir: Path, base_path: Path) -> str | None:
    """The first LoRA layer whose shape does not fit the base's layer of the same name (or that the base
    lacks); None when all fit, or the base's headers say nothing (a pre-quantized base's are packed)."""
    from qlora_dist.model import folder

    if not base_path.is_dir() or "quantization_config" in (folder.read_config(base_path) or {}):
        return None
    shapes = folder.weight_shapes(base_path)
    for key, t in folder.header(adapter_dir / "adapter_model.safetensors").items():
        if not isinstance(t, dict) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            continue
        module = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
        base_shape = shapes.get(module + ".weight")
        if shapes and base_shape is None:
            return f"its LoRA layer {module} is not a layer of the base"
        side, dim = ("in", 1) if ".lora_A." in key else ("out", 0)
        if base_shape is not None and len(base_shape) == 2 and t["shape"][dim] != base_shape[dim]:
            return (f"its LoRA layer {module} has {t['shape'][dim]} {side} features, the base's "
                    f"{base_shape[dim]}")
    return None


def base_problems(adapter_dir: Path | str, base: str | Path, option: str, override: str,
                  quantization: dict | None = None, allowed: bool = False) -> list[str]:
    """[one line] when the adapter was trained on another base than `base` (a model.path) as far as it
    records; [] otherwise. option: what names the adapter (--adapter, train.init_adapter); override: how
    to apply it anyway, and `allowed`: the user gave it (the mismatch is then logged, not refused).
    quantization: the run's {bits, quant_type, double_quant} to compare too (training from a starting
    adapter; inference loads the base as the adapter records)."""
    why = base_mismatch(Path(adapter_dir), base, quantization)
    if why and allowed:
        dist.log(f"warning: {option}: {adapter_dir} {why}; applied anyway ({override})")
    return [f"{option}: {adapter_dir} {why}; use the base it was trained on, or {override} to apply it anyway"] \
        if why and not allowed else []


def base_mismatch(adapter_dir: Path, base: str | Path, quantization: dict | None = None) -> str | None:
    """What the adapter records that contradicts `base` (the first thing found), or None."""
    saved = read(adapter_dir) or {}
    recorded, where = _recorded_identity(adapter_dir, saved)
    given = base_identity(base)
    why = None
    if recorded.get("base_model_type") and given and recorded["base_model_type"] != given["base_model_type"]:
        why = (f"was trained on a {recorded['base_model_type']!r} base ({where}), but {base} is a "
               f"{given['base_model_type']!r} model")
    elif recorded.get("base_config_sha256") and given and recorded["base_config_sha256"] != given["base_config_sha256"]:
        why = f"was trained on a base whose config.json differs from {base}'s ({where} records sha256 " \
              f"{recorded['base_config_sha256'][:12]}..., {base}'s is {given['base_config_sha256'][:12]}...)"
    elif shape := _shape_problem(adapter_dir, _folder_of(base)):
        why = f"does not fit {base}: {shape}"
    elif quantization and saved and (diff := [k for k in QUANT_KEYS if saved[k] != quantization[k]]):
        why = ("was trained on a base quantized with " + ", ".join(f"{k}={saved[k]!r}" for k in diff)
               + f" ({adapter_dir / FILE}), this run has " + ", ".join(f"quantization.{k}={quantization[k]!r}" for k in diff))
    return why


def _folder_of(base: str | Path) -> Path:
    from qlora_dist.model import builtin

    return builtin.builtin_folder(str(base)) if builtin.is_builtin(base) else Path(base).expanduser()
