"""Run under torchrun (ZeRO-3): for each tiny family in turn, in one process group (imports and DeepSpeed
set-up paid once), train a few steps, counting the bytes the run's save gathers, and write what
each rank holds of the base beside the planner's figures, and the trained model's logits on a fixed batch.

usage: families_zero3.py OUT FAMILY[,FAMILY...] key=value ...   (writes OUT/FAMILY/{result.json,trained_logits.pt})
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from memory_actual import _held, _quant_state_bytes  # noqa: E402 (sets the library environment)
from zero3_export import count_gathered_bytes  # noqa: E402

import bitsandbytes as bnb  # noqa: E402

from qlora_dist import memory  # noqa: E402
from qlora_dist.config import load_config  # noqa: E402
from qlora_dist.data.batches import collate  # noqa: E402
from qlora_dist import dist  # noqa: E402
from qlora_dist.launch.job import prepare  # noqa: E402
from qlora_dist.train.trainer import Trainer  # noqa: E402


def base_items(model) -> dict[str, int]:
    """What this rank holds of the frozen base, as the planner's weight items name it."""
    items = {"base_nf4": 0, "quant_constants": 0, "base_16bit": 0}
    for p in model.parameters():
        if isinstance(p, bnb.nn.Params4bit):
            items["base_nf4"] += _held(p)
            items["quant_constants"] += _quant_state_bytes(p.quant_state)
        elif not p.requires_grad:
            items["base_16bit"] += _held(p)
    return items


def one_family(family: str, out: Path, overrides: list[str]) -> None:
    cfg = load_config(overrides=[*overrides, f"model.path=tiny:{family}", f"train.output_dir={out}"])
    trainer = Trainer(cfg, prepare(cfg))
    trainer.setup()
    gathered, save = [], trainer.save
    trainer.save = lambda: gathered.append(count_gathered_bytes(save))  # the run's own save, counted
    trainer.train()  # saves once, at the last step
    engine = trainer.engine
    lora_bytes = sum(p.ds_numel * p.element_size() for p in engine.module.parameters() if p.requires_grad)
    held = dist.gather_objects(base_items(engine.module))
    planned = memory.weight_items(memory.setup_from_config(trainer.cfg, trainer.info.world_size, on_gpu=False))
    batch = collate(trainer.rows[:4], trainer.tokenizer.pad_token_id)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    if trainer.info.is_main:
        torch.save({"logits": logits, "batch": batch}, out / "trained_logits.pt")
        (out / "result.json").write_text(json.dumps({
            "gathered_bytes": gathered, "lora_bytes": lora_bytes, "held": held, "planned": planned,
            "world_size": trainer.info.world_size, "zero_stage": trainer.zero_stage}))
    dist.barrier()
    trainer.cleanup()


def main(argv: list[str]) -> None:
    # One process group for all the runs: DeepSpeed 0.19.8 keeps the first group in its globals and
    # cannot train in a second one after destroy_process_group (as tests/workers/train_cases.py).
    shutdown, dist.shutdown = dist.shutdown, lambda: None
    out, families, overrides = Path(argv[0]), argv[1].split(","), argv[2:]
    for family in families:
        one_family(family, out / family, overrides)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
    dist.leave(0)  # see compat.exit_without_finalization
