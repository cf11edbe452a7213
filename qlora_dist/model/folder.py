"""A Hugging Face model folder, inspected without reading a weight: config.json, the architecture, the
tokenizer files, and each safetensors file's header (8-byte length + JSON) against the file's length, so
a truncated download is found in milliseconds instead of as a failure after minutes of loading."""
from __future__ import annotations

import json
import struct
from pathlib import Path

# The families tests/test_families.py trains end to end (tiny random models of model/builtin.py): NF4 load
# through from_pretrained and the layer-wise loader, LoRA on every linear layer, 2-rank ZeRO-3, export,
# reload, packing, MMLU, generate, merge; and the planner to the byte. README.md has the same table.
TESTED_FAMILIES = {
    "llama": "LLaMA-1, Llama-2, Llama-3.x (GQA, llama3 rope scaling, tied or untied embeddings)",
    "mistral": "Mistral (GQA, sliding window)",
    "qwen2": "Qwen2 / Qwen2.5 (q/k/v biases)",
    "qwen3": "Qwen3 dense (q/k norms)",
    "gemma2": "Gemma-2 (soft-capping, 4 norms a layer; the fused loss steps aside)",
    "phi3": "Phi-3 (fused qkv and gate_up projections)",
}
SUPPORTED_MODEL_TYPES = tuple(TESTED_FAMILIES)
# Mixture-of-experts: transformers 5.x keeps each layer's experts as fused 3-D parameters (MixtralExperts,
# Qwen3MoeExperts: gate_up_proj [experts, 2 x inter, hidden]), which are not nn.Linear, so bitsandbytes
# leaves them in 16 bit (no NF4) and LoRA on "all linear layers" never reaches them.
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
MAX_HEADER = 100 * 2**20  # safetensors refuses headers over 100 MB too
# Written by a fully fine-tuned run into its model/ folder (train/model_export.py): {"method": "full", ...}.
FULL_MARK = "qlora_dist.json"


def fully_fine_tuned(path: Path | str | None) -> bool:
    """Whether `path` is the model/ folder of a train.method=full run (16-bit weights, no adapter)."""
    mark = Path(path) / FULL_MARK if path else None
    try:
        return bool(mark and mark.is_file() and json.loads(mark.read_text()).get("method") == "full")
    except (OSError, ValueError, AttributeError):
        return False


def not_an_adapter(path: Path | str, option: str) -> str:
    """The line for a fully fine-tuned model given where an adapter is expected (merge, generate, init_adapter)."""
    return (f"{option}: {path} is a fully fine-tuned model (train.method=full), not a PEFT adapter: there is no "
            f"adapter to apply or merge; use the folder itself as the model (model.path={path} or --base {path})")


def safetensors_problems(path: Path, key: str = "model.path") -> list[str]:
    """[] when the file's header parses and the file is as long as the header says; else one line."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return [f"{key}: {path}: {size} bytes: too short to be a safetensors file"]
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            return [f"{key}: {path}: not a safetensors file, or truncated (header of {n:,} bytes, file {size:,})"]
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return [f"{key}: {path}: safetensors header is not valid JSON (damaged file)"]
    ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__" and isinstance(t, dict)
            and len(t.get("data_offsets", ())) == 2]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return [f"{key}: {path}: {size:,} bytes, but its header describes {expected:,}: "
                f"{'truncated' if size < expected else 'damaged'} (download it again)"]
    return []


def header(path: Path) -> dict:
    """A safetensors file's header (tensor name -> dtype, shape, offsets); {} when unreadable (the
    problems above say why)."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(MAX_HEADER, path.stat().st_size - 8):
                return {}
            found = json.loads(f.read(n))
    except (OSError, struct.error, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


def weight_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's shape in a model folder's safetensors files, from their headers (no tensor read)."""
    files, _ = _weight_files(path, "")
    return {name: t["shape"] for f in files if f.suffix == ".safetensors" for name, t in header(f).items()
            if isinstance(t, dict) and "shape" in t}


def read_config(path: Path) -> dict | None:
    """A model folder's config.json as a dict; None when it has no readable one (config_problems says why)."""
    try:
        config = json.loads((Path(path) / "config.json").read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) else None


def max_positions(path: Path) -> int | None:
    """The positions a model was made for (config.json's max_position_embeddings; None if it says none)."""
    value = (read_config(path) or {}).get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def config_problems(path: Path, key: str = "model.path") -> list[str]:
    """config.json's problems: missing, unreadable, a family we cannot train, missing sizes."""
    file = path / "config.json"
    if not file.is_file():
        return [f"{key}: {path} has no config.json: not a Hugging Face model folder"]
    try:
        config = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        return [f"{key}: {file}: not a text file"]
    except json.JSONDecodeError as exc:
        return [f"{key}: {file}:{exc.lineno}: not valid JSON: {exc.msg}"]
    if not isinstance(config, dict):
        return [f"{key}: {file}: expected a JSON object"]
    if family_problem := unsupported(config):
        return [f"{key}: {path} holds a {config.get('model_type')!r} model: {family_problem}"]
    missing = [k for k in CONFIG_KEYS if not isinstance(config.get(k), int)]
    return [f"{key}: {file}: missing or non-integer {', '.join(missing)}"] if missing else []


def unsupported(config: dict) -> str | None:
    """Why a config.json's model cannot be trained here and what would work; None when it can."""
    tested = ", ".join(TESTED_FAMILIES)
    experts = next((config[k] for k in EXPERT_KEYS if isinstance(config.get(k), int) and config[k] > 0), None)
    if experts:
        return (f"a mixture of {experts} experts, which transformers stores as fused 3-D parameters that "
                "bitsandbytes does not quantize to NF4 and LoRA on linear layers does not reach; "
                f"qlora-dist trains dense decoder-only models: {tested} (e.g. a dense Qwen3 or Mistral instead "
                "of Qwen3-MoE or Mixtral)")
    if config.get("model_type") not in TESTED_FAMILIES:
        return f"not a tested family; qlora-dist trains model_type {tested} (see the families table in README.md)"
    return None


def _weight_files(path: Path, key: str) -> tuple[list[Path], list[str]]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return [], [f"{key}: {index}: not a valid safetensors index (a JSON object with a weight_map)"]
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            return [], [f"{key}: {path}: shard(s) named in model.safetensors.index.json are missing: {', '.join(missing)}"]
        return [path / s for s in shards], []
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"], []
    if list(path.glob("pytorch_model*.bin")):
        return [], []  # pickled weights: no header to check without unpickling; from_pretrained reads them
    return [], [f"{key}: {path} holds no weights (model.safetensors, a safetensors index, or pytorch_model*.bin)"]


def problems(path: Path, key: str = "model.path") -> list[str]:
    """Everything wrong with a model folder that can be known without reading a tensor."""
    if not path.is_dir():
        return [f"{key}: model folder not found: {path}" if not path.exists() else f"{key}: {path} is not a folder"]
    errs = config_problems(path, key)
    if not any(all((path / f).is_file() for f in group) for group in TOKENIZER_FILES):
        errs.append(f"{key}: {path} has no tokenizer files (tokenizer.json, tokenizer.model, or vocab.json + merges.txt)")
    files, weight_errs = _weight_files(path, key)
    errs += weight_errs
    for file in files:
        errs += safetensors_problems(file, key)
    return errs
