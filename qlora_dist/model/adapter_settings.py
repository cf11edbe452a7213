"""The run's settings that travel with an adapter, and the base loading they imply outside training.

An adapter learned to correct one particular quantized base: NF4 or FP4, with or without double
quantization. `generate`, `eval mmlu` and `merge` must load that same base, so the checkpoint writes
ADAPTER/qlora_dist.json beside the PEFT files:
    {"base_model", "bits", "quant_type", "double_quant", "compute_dtype", "prompt_template"}
An adapter made by another tool has no such file: its base is loaded with the recipe's defaults (NF4,
double quantization). The compute dtype is not taken from the file: it is this machine's choice
(precision.resolve_compute_dtype), since the quantized weights are the same in any compute dtype.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qlora_dist import atomic, recipe
from qlora_dist.errors import ConfigError
from qlora_dist import dist
from qlora_dist.precision import DTYPES, QUANT_TYPES, resolve_compute_dtype

FILE = "qlora_dist.json"
_CHECKS = {  # key -> (is the value valid, what is allowed)
    "base_model": (lambda v: isinstance(v, str), "a string"),
    "bits": (lambda v: v in (4, 16), "4 or 16"),
    "quant_type": (lambda v: v in QUANT_TYPES, " or ".join(QUANT_TYPES)),
    "double_quant": (lambda v: isinstance(v, bool), "true or false"),
    "compute_dtype": (lambda v: v in DTYPES, " or ".join(DTYPES)),
    "prompt_template": (lambda v: isinstance(v, str), "a string"),
}


def write(adapter_dir: Path, *, base_model: str, bits: int, quant_type: str, double_quant: bool,
          compute_dtype: str, prompt_template: str = "guanaco") -> None:
    """ADAPTER/qlora_dist.json (atomically); compute_dtype is the resolved one the run trained in."""
    settings = dict(base_model=str(base_model), bits=bits, quant_type=quant_type, double_quant=double_quant,
                    compute_dtype=compute_dtype, prompt_template=prompt_template)
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

    def describe(self) -> str:
        if self.bits == 16:
            return "16-bit"
        return f"4-bit {self.quant_type.upper()} {'with' if self.double_quant else 'without'} double quant"


def base_loading(adapter_dir: Path | str | None, bits: int | None = None, quant_type: str | None = None,
                 double_quant: bool | None = None, compute_dtype: str = "auto") -> BaseLoading:
    """The adapter's base settings (its qlora_dist.json, else the recipe's defaults), each overridable
    (None: not overridden), and the resolved compute dtype; logged once, on rank 0."""
    saved = read(adapter_dir) if adapter_dir else None
    source = str(Path(adapter_dir) / FILE) if saved else "the recipe's defaults"
    saved = saved or {"bits": 4, "quant_type": recipe.QUANT_TYPE, "double_quant": recipe.DOUBLE_QUANT}
    dtype, why = resolve_compute_dtype(compute_dtype)
    loading = BaseLoading(saved["bits"] if bits is None else bits, quant_type or saved["quant_type"],
                          saved["double_quant"] if double_quant is None else double_quant, dtype)
    overridden = ", with overrides" if (bits, quant_type, double_quant) != (None, None, None) else ""
    dist.log(f"base model: {loading.describe()} (from {source}{overridden}); compute dtype {dtype} ({why})")
    return loading
