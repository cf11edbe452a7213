"""Run under torchrun: DoRA, LoftQ and PiSSA cases in one process group (imports and DeepSpeed set-up paid once).

usage: dora_cases.py OUT NAME:key=value,... ... -- key=value ...   (the keys after -- apply to all)
  copy=FOLDER among a case's keys: FOLDER (another case's checkpoint) is copied into OUT/NAME first, so the
  case resumes from it (as tests/workers/train_cases.py).
Each case trains into OUT/NAME; rank 0 writes OUT/NAME/magnitudes-start.safetensors (every DoRA magnitude,
gathered, as the engine holds it before the first step; DoRA cases), OUT/NAME/trained_logits.pt (the trained
model's logits on a fixed batch, computed by all ranks under the run's ZeRO stage) and OUT/NAME/base_sha256.json
(each NF4 base weight's bytes, hashed whole: a LoftQ / PiSSA base is checked against its one-rank rebuild).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _magnitudes(trainer) -> dict[str, torch.Tensor] | None:
    """Every DoRA magnitude, whole, on rank 0 (a collective under ZeRO-3)."""
    from qlora_dist.train.checkpoint import adapter_state_dict

    state = adapter_state_dict(trainer.engine.module, trainer.zero_stage)
    # named as in the saved adapter (peft drops the adapter's name: ...lora_magnitude_vector)
    return None if state is None else {n.split(".default")[0]: t.float() for n, t in state.items()
                                       if "lora_magnitude_vector" in n}


def _base_sha256(model, zero3: bool) -> dict[str, str]:
    """sha256 of every NF4 base weight as stored (packed codes, absmax, nested absmax and offset), each
    gathered whole under ZeRO-3: a LoftQ / PiSSA base rebuilt on one rank must give the same bytes."""
    import hashlib
    from contextlib import nullcontext

    import bitsandbytes as bnb
    import deepspeed

    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        with deepspeed.zero.GatheredParameters([m.weight]) if zero3 else nullcontext():
            qs = m.weight.quant_state
            parts = [m.weight.data, qs.absmax, *([qs.state2.absmax, qs.offset] if qs.nested else [])]
            digest = hashlib.sha256(b"".join(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in parts))
        out[name.replace("base_model.model.", "").replace(".base_layer", "")] = digest.hexdigest()
    return out


def run_case(out: Path, overrides: list[str]) -> None:
    from safetensors.torch import save_file

    from qlora_dist import dist
    from qlora_dist.config import load_config
    from qlora_dist.data.batches import collate
    from qlora_dist.launch.job import prepare
    from qlora_dist.train.trainer import Trainer

    cfg = load_config(overrides=[*overrides, f"train.output_dir={out}"])
    trainer = Trainer(cfg, prepare(cfg))
    trainer.setup()
    start = _magnitudes(trainer)
    if dist.is_main() and start:
        save_file(start, str(out / "magnitudes-start.safetensors"))
    trainer.train()  # saves the adapter at the end, as usual
    batch = collate(trainer.rows[:4], trainer.tokenizer.pad_token_id)
    trainer.engine.eval()
    with torch.no_grad():
        logits = trainer.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    hashes = _base_sha256(trainer.engine.module, trainer.zero_stage == 3)  # a collective under ZeRO-3
    if dist.is_main():
        torch.save({"logits": logits, "batch": batch}, out / "trained_logits.pt")
        (out / "base_sha256.json").write_text(json.dumps(hashes, indent=1))
    dist.barrier()
    trainer.cleanup()


if __name__ == "__main__":
    from train_cases import run_as_script  # this folder is the script's: on sys.path

    run_as_script(run_case)
