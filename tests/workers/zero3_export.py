"""A case of tests/workers/train_cases.py (`worker=zero3_export` among its keys): train a few steps, then
save a checkpoint while counting every byte that collectives gather, and dump the trained model's logits on
a fixed batch (rank 0 writes FOLDER/gathered.json and FOLDER/trained_logits.pt)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qlora_dist.config import load_config
from qlora_dist.data.batches import collate
from qlora_dist.launch.job import prepare
from qlora_dist.train.trainer import Trainer

GATHERS = ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_object", "broadcast")


def _delivered_bytes(args, kwargs) -> int:
    """Bytes a gather/broadcast call writes into this rank's output tensor(s)."""
    first = kwargs.get("output_tensor", kwargs.get("tensor_list", kwargs.get("tensor", args[0] if args else None)))
    tensors = first if isinstance(first, (list, tuple)) else [first]
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def count_gathered_bytes(fn):
    """Call fn while counting the bytes every all-gather/broadcast delivers to this rank: torch's
    functions, and the all-gather function deepspeed.comm captured from torch when it started."""
    from deepspeed.comm import comm as ds_comm

    counted = {"bytes": 0}
    patched = [(torch.distributed, name) for name in GATHERS]
    if getattr(ds_comm.cdb, "all_gather_function", None) is not None:
        patched.append((ds_comm.cdb, "all_gather_function"))
    originals = [(obj, name, getattr(obj, name)) for obj, name in patched]

    def wrap(original):
        def wrapper(*args, **kwargs):
            counted["bytes"] += _delivered_bytes(args, kwargs)
            return original(*args, **kwargs)
        return wrapper

    for obj, name, original in originals:
        setattr(obj, name, wrap(original))
    try:
        fn()
    finally:
        for obj, name, original in originals:
            setattr(obj, name, original)
    return counted["bytes"]


def run_case(out: Path, overrides: list[str]) -> None:
    cfg = load_config(overrides=[*overrides, f"train.output_dir={out}"])
    trainer = Trainer(cfg, prepare(cfg))
    trainer.setup()
    trainer.train()  # saves at the end, as usual
    engine = trainer.engine
    lora_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size()
                     for p in engine.module.parameters() if p.requires_grad)
    base_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size()
                     for p in engine.module.parameters() if not p.requires_grad)
    gathered = count_gathered_bytes(trainer.save)
    batch = collate(trainer.rows[:4], trainer.tokenizer.pad_token_id)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    if trainer.info.is_main:
        torch.save({"logits": logits, "batch": batch}, f"{out}/trained_logits.pt")
        with open(f"{out}/gathered.json", "w") as f:
            json.dump({"gathered_bytes": gathered, "lora_bytes": lora_bytes, "base_bytes": base_bytes,
                       "world_size": trainer.info.world_size, "zero_stage": trainer.zero_stage}, f)
    torch.distributed.barrier()
    trainer.cleanup()

