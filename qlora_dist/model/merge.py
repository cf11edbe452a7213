"""Merge a LoRA adapter into its base: a plain 16-bit Hugging Face folder, no quantization config.

The adapter was trained against the NF4-quantized base, not the original 16-bit weights, so the merge
starts from the same thing: the base loaded exactly as training loaded it (model.load_base with the
quantization in the adapter's qlora_dist.json, else the recipe's NF4 + double quant), in this machine's
compute dtype, each Linear4bit weight dequantized with bitsandbytes.functional.dequantize_4bit, then
LoRA merged into those (W + alpha/r * B @ A, peft's merge_and_unload) in the output dtype. Merging into
the original weights instead would add the quantization error back on top of what the adapter learned
to correct.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qlora_dist import atomic
from qlora_dist.errors import ConfigError, RunFault
from qlora_dist.model.adapter_settings import BaseLoading, base_loading
from qlora_dist.model.adapter_settings import read as read_settings
from qlora_dist.model.base import adapter_problems, load_adapter, load_base_for, load_tokenizer
from qlora_dist.model.builtin import resolve_model_path
from qlora_dist.precision import DTYPES

MERGE_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # --dtype -> its name in precision.DTYPES


def dequantized_state_dict(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights in `dtype`: Linear4bit weights dequantized, everything else cast."""
    import bitsandbytes as bnb

    state = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            state[f"{prefix}weight"] = weight.to(dtype)
            if module.bias is not None:
                state[f"{prefix}bias"] = module.bias.data.to(dtype)
            continue
        if isinstance(getattr(module, "weight", None), bnb.nn.Params4bit):
            continue
        for pname, param in module.named_parameters(recurse=False):
            state[f"{prefix}{pname}"] = param.data.to(dtype)
    return state


def dequantized_base(path: Path, loading: BaseLoading, out_dtype: str):
    """A plain LlamaForCausalLM in `out_dtype` holding the dequantized base (no quantization_config)."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[out_dtype]
    quantized = load_base_for(path, loading)
    state = dequantized_state_dict(quantized, dtype)
    config = quantized.config
    del quantized
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    with torch.device("meta"):  # no random init of weights that are overwritten next
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"dequantized state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.model.rotary_emb = type(plain.model.rotary_emb)(config)  # its buffers were made on meta
    return plain.eval()


def merge(base: str, adapter: str | Path, out: str | Path, dtype: str = "bf16", compute_dtype: str = "auto",
          allow_base_mismatch: bool = False) -> Path:
    """Write base + adapter merged, in `dtype` (bf16|fp16), with the tokenizer, to `out` (atomically).
    compute_dtype ("auto" or a dtype name): what the quantized base is loaded and dequantized in. Every
    input problem (out, dtype, an adapter of another base) is raised at once, before a weight is read."""
    out, adapter = Path(out), Path(adapter)
    problems = atomic.output_problems(out, "--out", folder=True, empty=True)
    if dtype not in MERGE_DTYPES:
        problems.append(f"--dtype: {dtype!r} is not allowed; choose one of {', '.join(MERGE_DTYPES)}")
    path = resolve_model_path(base)
    problems += adapter_problems(adapter, base, allow_mismatch=allow_base_mismatch)
    if not problems and (read_settings(adapter) or {}).get("bits") == 8:
        # dequantized_state_dict knows NF4/FP4 (dequantize_4bit); an int8 weight cast as it is would lose its
        # per-row scale, so a merge of an LLM.int8 adapter is refused rather than written wrong
        problems.append(f"--adapter: {adapter} was trained on an 8-bit (LLM.int8) base, which merge does not "
                        "dequantize yet; use it as an adapter (generate, eval) on that base")
    if problems:
        raise ConfigError(problems)
    loading = base_loading(adapter, compute_dtype=compute_dtype)
    model = load_adapter(dequantized_base(path, loading, MERGE_DTYPES[dtype]), adapter, trainable=False)
    merged = model.merge_and_unload()
    try:
        with atomic.folder(out) as tmp:  # replaces `out` only if it is empty (checked above)
            merged.save_pretrained(tmp)
            load_tokenizer(path).save_pretrained(tmp)
    except OSError as exc:  # checked writable before; a disk that filled since (the partial folder is gone)
        raise RunFault(f"--out: could not write the merged model to {out}: {exc.strerror or exc}") from None
    return out
