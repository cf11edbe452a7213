"""The fully fine-tuned model (train.method=full) as a Hugging Face folder: OUTPUT/model/.

    model/config.json, generation_config.json   the model's config (no quantization: 16-bit weights)
    model/model-0000i-of-0000n.safetensors        one file per piece: embeddings, each decoder layer, norm, lm_head
    model/model.safetensors.index.json            which file holds each tensor (transformers' sharded layout)
    model/tokenizer files                         so that the folder is a model.path of its own
    model/qlora_dist.json                         {"method": "full", ...}: generate loads it in 16 bit, merge
                                                  and train.init_adapter say it is no adapter (model/folder.py)

`AutoModelForCausalLM.from_pretrained(model/)` loads it. Under ZeRO-3 the weights are gathered one piece at
a time (deepspeed.zero.GatheredParameters on every rank) and rank 0 writes that piece before the next is
gathered, so no rank holds more than its share plus one layer. transformers' `save_pretrained` shards a
state dict it is handed whole (5.24), and DeepSpeed's `stage3_gather_16bit_weights_on_model_save` (0.19.8)
gathers the whole model on rank 0 first: both break that bound on a model that does not fit one rank. The
pieces are the layer-wise loader's (model/loader.py), so the files follow the order the loader reads.
The weights written are the module's 16-bit ones, the values the forward uses (the trained logits are
reproduced exactly), not the fp32 masters.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from qlora_dist import atomic, dist
from qlora_dist.model.folder import FULL_MARK
from qlora_dist.model.loader import pieces

INDEX = "model.safetensors.index.json"


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _pieces_to_write(model) -> list[tuple[str, torch.nn.Module]]:
    """The loader's pieces; a tied lm_head is the embedding's tensor (transformers drops the tied key too)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return [(prefix, piece) for prefix, piece in pieces(model) if not (tied and prefix == "lm_head")]


def _piece_state(piece: torch.nn.Module, prefix: str, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The piece's weights, whole, on rank 0 (None elsewhere). Collective under ZeRO-3."""
    params = dict(piece.named_parameters())
    gather = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None)
    with gather:
        if not dist.is_main():
            return None
        return {f"{prefix}.{name}" if name else prefix: p.detach().cpu().clone().contiguous()
                for name, p in params.items()}


def export_model(model, tokenizer, out: Path, zero_stage: int, settings: dict) -> None:
    """Write `out` (atomically: a partial folder never carries the final name), `settings` (the run's base
    model, compute dtype, prompt format) in its qlora_dist.json. Every rank must call it."""
    from safetensors.torch import save_file

    pieces = _pieces_to_write(model)
    writing = atomic.folder(out, replace=True) if dist.is_main() else contextlib.nullcontext(None)
    with writing as tmp:
        weight_map, total = {}, 0
        for i, (prefix, piece) in enumerate(pieces, start=1):
            state = _piece_state(piece, prefix, zero_stage)
            if state is None:
                continue
            name = _shard_name(i, len(pieces))
            save_file(state, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in state})
            total += sum(t.numel() * t.element_size() for t in state.values())
            del state  # one piece at a time
        if tmp is not None:
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
            _write_config(model, tmp)
            tokenizer.save_pretrained(str(tmp))
            (tmp / FULL_MARK).write_text(json.dumps({"method": "full", **settings}, indent=2))
    dist.barrier("write the trained model's folder")


def _write_config(model, folder: Path) -> None:
    config = model.config
    config.use_cache = True  # training turned it off; a reader generating from the folder wants it
    config.save_pretrained(str(folder))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))
    config.use_cache = False


def model_problems(folder: Path) -> list[str]:
    """Why `folder` is not a whole exported model (headers against lengths, the index's files): for `verify`."""
    from qlora_dist.model.folder import safetensors_problems

    index = folder / INDEX
    if not index.is_file():
        return [f"{folder.name}/{INDEX}: missing"]
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError):
        return [f"{folder.name}/{INDEX}: not a safetensors index (damaged)"]
    problems = [f"{folder.name}/{f}: missing" for f in files if not (folder / f).is_file()]
    return problems or [p for f in files for p in safetensors_problems(folder / f, folder.name)]
