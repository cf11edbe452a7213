"""The DeepSpeed JSON files of ds_configs/: where they are, reading one (errors naming the file and line),
and the ZeRO stage one asks for. No engine here: the planner and the preflight read them before loading."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_dist.errors import ConfigError


def ds_configs_dir() -> Path:
    # Source checkout and editable installs: the top-level ds_configs/; a wheel: packaged beside us.
    top = Path(__file__).resolve().parents[1] / "ds_configs"
    if top.is_dir():
        return top
    from importlib.resources import files

    return Path(str(files("qlora_dist.ds_configs")))


def known_ds_configs() -> list[str]:
    return sorted(p.stem for p in ds_configs_dir().glob("*.json"))


def read_ds_config(name_or_path: str) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path) if name_or_path.endswith(".json") else ds_configs_dir() / f"{name_or_path}.json"
    try:
        return json.loads(path.read_text()), str(path)
    except FileNotFoundError:
        raise ConfigError([f"dist.ds_config: file not found: {path}"]) from None
    except json.JSONDecodeError as exc:
        raise ConfigError([f"dist.ds_config: {path}:{exc.lineno}: not valid JSON: {exc.msg}"]) from None


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
