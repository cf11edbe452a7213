"""Layer-by-layer loading: quantize each layer as it is read and (under ZeRO-3) partition it at once.

transformers does not use `deepspeed.zero.Init` for quantized models, so `from_pretrained` puts the
whole 4-bit model on every rank before ZeRO-3 partitions it (a 65B model then never fits GPUs smaller
than its NF4 size). Here the model skeleton is built on the `meta` device, and for each piece in turn —
embeddings, every decoder layer, the final norm, `lm_head` — its tensors are read (safetensors), its
linear layers become NF4 `Linear4bit`s quantized on the spot, and `zero.Init(module=piece)` partitions
it before the next piece is read. A rank's peak is then about its share of the model plus one layer.
(The layer-wise quantize-while-loading idea comes from AnswerDotAI's fsdp_qlora, done for DeepSpeed.)

Every rank reads and quantizes each layer: `zero.Init` broadcasts rank 0's packed data, but the
quantization constants (`quant_state`) are a plain attribute that stays whole on every rank (~3% of the
NF4 bytes), and each rank computes the same ones from the same weights.
"""
from __future__ import annotations

import gc
import json
import zlib
from pathlib import Path
from typing import Protocol

import torch

from qlora_dist import compat
from qlora_dist.errors import ConfigError
from qlora_dist.precision import DTYPES, quantization_config



class TensorSource(Protocol):
    def get(self, name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor: ...


class SafetensorsSource:
    """Tensors of a Hugging Face folder (one model.safetensors or shards with an index)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.folder}: no model.safetensors or model.safetensors.index.json "
                                    "(the layer-wise loader reads safetensors checkpoints)")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.handles = {f: safe_open(str(self.folder / f), framework="pt") for f in files}
        self.where = weight_map or {k: "model.safetensors" for k in self.handles["model.safetensors"].keys()}

    def get(self, name, shape, dtype, device):
        if name not in self.where:
            raise KeyError(f"{self.folder}: tensor {name!r} not found in the checkpoint")
        tensor = self.handles[self.where[name]].get_tensor(name)
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.folder}/{self.where[name]}: {name} has shape {tuple(tensor.shape)}, "
                             f"the config expects {tuple(shape)}")
        return tensor.to(device=device, dtype=dtype)


class RandomSource:
    """Random weights of the right shapes, made on the target device (benchmarks of real shapes, e.g.
    the 65B, without 130 GB of files). Deterministic per tensor name; norms start at one."""

    def __init__(self, seed: int = 0, std: float = 0.02):
        self.seed, self.std = seed, std

    def get(self, name, shape, dtype, device):
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype, device=device)
        gen = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * self.std).to(dtype)


def pieces(model) -> list[tuple[str, torch.nn.Module]]:
    """The units loaded (and partitioned) one at a time, in forward order (also the files of a fully fine-tuned
    model, train/model_export.py). Every tested family (see model/folder.py TESTED_FAMILIES) names them alike: model.embed_tokens, model.layers.N, model.norm,
    lm_head; a model with parameters elsewhere is refused here rather than left on `meta`."""
    inner = model.model
    found = [("model.embed_tokens", inner.embed_tokens)]
    found += [(f"model.layers.{i}", layer) for i, layer in enumerate(inner.layers)]
    found += [("model.norm", inner.norm), ("lm_head", model.lm_head)]
    covered = {id(p) for _, piece in found for p in piece.parameters()}
    if stray := [name for name, p in model.named_parameters() if id(p) not in covered]:
        raise ConfigError([f"model.loader: {type(model).__name__}: the layer-wise loader does not know where "
                           f"{', '.join(stray[:3])} belong; use model.loader=hf"])
    return found


def _linear4bit(linear: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None, quant: dict,
                device) -> torch.nn.Module:
    """An NF4 Linear4bit as transformers' from_pretrained makes it: weight packed, bias kept in 16 bit."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias is not None, device="meta",
                              compute_dtype=quant["compute_dtype"], compress_statistics=quant["double_quant"],
                              quant_type=quant["quant_type"], quant_storage=quant["compute_dtype"])
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=quant["double_quant"],
                                     quant_type=quant["quant_type"], quant_storage=quant["compute_dtype"],
                                     module=layer).to(device)  # .to() quantizes
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return layer


def _real_buffers(root: torch.nn.Module, config, device) -> None:
    """Give the buffers that `meta` left empty their values: they are computed, not stored (persistent=False).
    Rotary embeddings are rebuilt from the config; Gemma's scaled embedding holds sqrt(hidden)."""
    for name, module in list(root.named_modules()):
        if not any(b.device.type == "meta" for b in module.buffers(recurse=False)):
            continue
        if hasattr(module, "scalar_embed_scale"):  # Gemma2TextScaledWordEmbedding (transformers 5.24)
            module.embed_scale = torch.tensor(module.scalar_embed_scale, device=device)
        elif "RotaryEmbedding" in type(module).__name__ and not list(module.parameters(recurse=False)):
            with torch.device(device):
                new = type(module)(config)
            parent_name, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)
        else:
            raise ConfigError([f"model.loader: {type(module).__name__} ({name}): a buffer the layer-wise loader "
                               "cannot rebuild; use model.loader=hf"])


ROW_NORMS = "_qlora_row_norms"  # attribute of a linear layer: its weight's row norms, fp32 (DoRA's start)


def row_norms(layer: torch.nn.Module) -> torch.Tensor:
    """The L2 norm of each output row of the layer's weight as the forward uses it (NF4 dequantized, else
    as stored), as peft 0.21.2's DoRA computes its starting magnitude (B is zero then): in the weight's
    dtype (a bf16 weight gives bf16-rounded norms), returned as fp32."""
    weight = layer.weight
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    return torch.linalg.norm(weight.detach(), dim=1).float()


def _keep_row_norms(piece: torch.nn.Module, prefix: str) -> None:
    """Record the row norms of every linear layer of a piece while its weights are whole: under ZeRO-3 the
    piece is partitioned next, and DoRA's magnitude (peft) would then be computed from an empty slice."""
    import bitsandbytes as bnb

    if prefix == "lm_head":  # never a LoRA target
        return
    for child in piece.modules():
        if isinstance(child, (torch.nn.Linear, bnb.nn.Linear4bit)):
            setattr(child, ROW_NORMS, row_norms(child))


def _linear(child: torch.nn.Linear, full: str, source: TensorSource, quant: dict | None, dtype: torch.dtype,
            device, init) -> torch.nn.Module:
    """One linear layer with real weights: NF4 when quant, else 16-bit in place. With init (a LoRA layer
    of a base-changing start) its weight is split first and the adapter's start kept on it (INIT_WEIGHTS)."""
    from qlora_dist.model.adapter_init import INIT_WEIGHTS

    weight = source.get(f"{full}.weight", child.weight.shape, dtype, device)
    bias = None if child.bias is None else source.get(f"{full}.bias", child.bias.shape, dtype, device)
    if init is not None:
        weight, a, b = init.split(weight, quant)
    if quant:
        new = _linear4bit(child, weight, bias, quant, device)
    else:
        new = child
        new.weight = torch.nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            new.bias = torch.nn.Parameter(bias, requires_grad=False)
    if init is not None:
        setattr(new, INIT_WEIGHTS, (a, b))
    return new


def _materialize(piece: torch.nn.Module, prefix: str, source: TensorSource, quant: dict | None,
                 dtype: torch.dtype, device, init=None) -> None:
    """Give one meta piece real (and, for linear layers, quantized) weights. init (model/adapter_init.py
    AdapterInit): each LoRA layer's weight is first split into the base's part and the adapter's start."""
    for name, child in list(piece.named_modules()):
        full = f"{prefix}.{name}" if name else prefix
        linear = isinstance(child, torch.nn.Linear) and prefix != "lm_head"
        starts = init if linear and init is not None and init.applies_to(full) else None
        if linear and (quant or starts):
            new = _linear(child, full, source, quant, dtype, device, starts)
            if name and new is not child:
                parent_name, _, attr = name.rpartition(".")
                setattr(piece.get_submodule(parent_name) if parent_name else piece, attr, new)
            continue
        for pname, param in list(child.named_parameters(recurse=False)):
            if param.device.type == "meta":
                value = source.get(f"{full}.{pname}", param.shape, dtype, device)
                child._parameters[pname] = torch.nn.Parameter(value, requires_grad=False)


def attention_for(config, wanted: str) -> str:
    """`wanted` unless the family's class cannot run it: Gemma-2 refuses sdpa (transformers 5.24:
    `_supports_sdpa = False`, sdpa has no attention soft-capping), so it runs eager attention."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if wanted == "sdpa" and cls is not None and not getattr(cls, "_supports_sdpa", True):
        from qlora_dist import dist

        dist.log(f"{cls.__name__} has no sdpa attention in transformers (soft-capping): using eager")
        return "eager"
    return wanted


def load_layerwise(config, source: TensorSource, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
                   compute_dtype: str = "bfloat16", device=None, ds_config: dict | None = None,
                   attn_implementation: str = "sdpa", on_piece=None, keep_row_norms: bool = False, init=None):
    """The config's causal LM (its family's own class, built on `meta` by AutoModelForCausalLM) loaded piece
    by piece; partitioned as it goes when ds_config is ZeRO-3. on_piece(name): called after each piece, on
    every rank alike (progress, or a stop point that raises). keep_row_norms: each linear layer keeps its
    weight's row norms (ROW_NORMS), taken before partitioning, for DoRA's magnitude. init: a base-changing
    adapter start (model/adapter_init.py: LoftQ, PiSSA), computed on each layer's 16-bit weights."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    device = torch.device(device or "cpu")
    dtype = DTYPES[compute_dtype]
    attn_implementation = attention_for(config, attn_implementation)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    quant = None if bits == 16 else {"compute_dtype": dtype, "quant_type": quant_type, "double_quant": double_quant}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for prefix, piece in pieces(model):
        if prefix == "lm_head" and tied:
            model.lm_head.weight = model.model.embed_tokens.weight  # already loaded (and partitioned)
            continue
        _materialize(piece, prefix, source, quant, dtype, device, init)
        _real_buffers(piece, config, device)  # before zero.Init, which moves buffers
        if keep_row_norms:
            _keep_row_norms(piece, prefix)
        if ds_config is not None:
            deepspeed.zero.Init(module=piece, config_dict_or_path=ds_config)
        gc.collect()
        compat.release_freed_memory()
        if on_piece:
            on_piece(prefix)
    _real_buffers(model, config, device)  # the rotary embedding, outside every piece
    if quant:
        model.config.quantization_config = quantization_config(bits, quant_type, double_quant, compute_dtype)
        model.is_loaded_in_4bit = True  # what peft checks to wrap Linear4bit layers with 4-bit LoRA
    compat.disable_cpu_weight_repacking(model)
    model.requires_grad_(False)
    model.eval()
    return model
