"""Run under torchrun (2 ranks, gloo): the mechanics of optim.master_weights=paged on real DeepSpeed, with a CPU
stand-in for the CUDA allocator (a clone whose data_ptr is recorded), put where engine.initialize looks it up.
For each ZeRO stage named, in bf16, three engines on the same batches: masters where DeepSpeed puts them (the
reference); masters moved at set-up, saving a DeepSpeed checkpoint halfway; a fresh engine with moved masters
that loads that checkpoint and continues. Rank 0 writes every rank's findings as JSON (out/paged_masters.json);
tests/test_paged_masters.py asserts on them.

  torchrun --nproc_per_node 2 tests/workers/paged_masters_cases.py OUT zero2,zero3 key=value ...
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch

from qlora_dist import compat

compat.set_library_env()
compat.quiet_known_warnings()

from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

from qlora_dist.config import load_config  # noqa: E402
from qlora_dist import dist  # noqa: E402
from qlora_dist.model.base import build_model  # noqa: E402
from qlora_dist.train import paged_masters  # noqa: E402
from qlora_dist.train.engine import build_ds_config, initialize  # noqa: E402

STEPS, SAVE_AT = 4, 2


class StandIn:
    """The CPU stand-in allocator: a copy on the same device, its data_ptr recorded."""

    def __init__(self):
        self.ptrs: set[int] = set()

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        new = t.clone()
        self.ptrs.add(new.data_ptr())
        return new


def build(cfg, info, stand_in: StandIn | None = None):
    """The product's engine set-up (engine.initialize), the stand-in in place of cuda_paged_like."""
    if stand_in is not None:
        paged_masters.cuda_paged_like = stand_in
    ds = build_ds_config(cfg, info.world_size)
    torch.manual_seed(cfg.train.seed)  # the same LoRA initialization for every engine
    return initialize(cfg, build_model(cfg, dist.device_for(info), ds), ds)


def batch(step: int, rank: int, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, vocab, (2, 16), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train(engine, steps: range, rank: int) -> list[float]:
    losses = []
    for s in steps:
        loss = engine(**batch(s, rank, engine.module.config.vocab_size)).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def lora(engine) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in engine.module.named_parameters() if p.requires_grad}


def state(engine) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each LoRA weight's whole fp32 master (collective) and this rank's bf16 weight (its ZeRO-3 partition)."""
    return {n: (safe_get_full_fp32_param(p).clone(), getattr(p, "ds_tensor", p).detach().clone())
            for n, p in lora(engine).items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(x, y) for n in a for x, y in zip(a[n], b[n]))


def weights_are_rounded_masters(engine) -> bool:
    """The bf16 weights the forward uses are the masters rounded, read through DeepSpeed's own links (ZeRO-1/2:
    each weight's hp fragment, which page_masters rebuilds; ZeRO-3: the flat partitions)."""
    opt = engine.optimizer
    if hasattr(opt, "fp16_partitioned_groups_flat"):
        return all(torch.equal(m.to(w.dtype), w) for m, w in
                   zip(paged_masters.master_tensors(opt), opt.fp16_partitioned_groups_flat))
    return all(torch.equal(safe_get_full_fp32_param(p).to(p.dtype), p.data) for p in lora(engine).values())


def record_stepped(engine) -> list[int]:
    """The data_ptrs of the tensors the client optimizer steps, recorded at each of its steps (ZeRO-3 fills its
    param_groups only for the step)."""
    base, seen = engine.optimizer.optimizer, []
    original = base.step

    def step(*args, **kwargs):
        seen.extend(p.data_ptr() for g in base.param_groups for p in g["params"])
        return original(*args, **kwargs)

    base.step = step
    return seen


def moved_run(cfg, info, ckpt: Path, row: dict) -> dict:
    """Masters moved at set-up; a checkpoint at SAVE_AT; returns the final state."""
    gc.collect()  # earlier engines' masters leave paged_masters_gb now, not while this one is built
    stand_in, before = StandIn(), paged_masters.paged_masters_gb()
    engine = build(cfg, info, stand_in)
    masters = paged_masters.master_tensors(engine.optimizer)
    row.update(master_numel=sum(t.numel() for t in masters),
               lora_numel=sum(getattr(p, "ds_numel", p.numel()) for p in lora(engine).values()),
               lora_tensors=len(lora(engine)),
               masters_moved=all(t.data_ptr() in stand_in.ptrs for t in masters),
               moved_gb=paged_masters.paged_masters_gb() - before,
               master_gb=sum(t.numel() * t.element_size() for t in masters) / 1e9,
               moved_again=paged_masters.page_masters(engine, stand_in))
    seen, start = record_stepped(engine), [t.detach().clone() for t in masters]
    losses = train(engine, range(SAVE_AT), info.rank)
    engine.save_checkpoint(str(ckpt), tag="engine", save_latest=False, exclude_frozen_parameters=True)
    row["moved_losses"] = losses + train(engine, range(SAVE_AT, STEPS), info.rank)
    row["stepped_the_moved"] = bool(seen) and all(ptr in stand_in.ptrs for ptr in seen)
    row["masters_updated_in_place"] = all(t.data_ptr() in stand_in.ptrs and not torch.equal(t, s)
                                          for t, s in zip(masters, start))
    row["weights_are_rounded_masters"] = weights_are_rounded_masters(engine)
    return state(engine)


def resumed_run(cfg, info, ckpt: Path, row: dict) -> dict:
    """A fresh engine (masters moved at set-up) loads the checkpoint and continues; returns the final state."""
    stand_in = StandIn()
    engine = build(cfg, info, stand_in)
    compat.load_engine_files_safely(engine)  # as checkpoint._load does
    engine.load_checkpoint(str(ckpt), tag="engine", load_module_strict=compat.LOAD_MODULE_STRICT,
                           load_optimizer_states=True, load_lr_scheduler_states=True)
    row["moved_after_load"] = paged_masters.apply(engine, cfg, "after loading")  # as Checkpointer.restore does
    row["still_moved_after_load"] = all(t.data_ptr() in stand_in.ptrs
                                        for t in paged_masters.master_tensors(engine.optimizer))
    row["resumed_losses"] = train(engine, range(SAVE_AT, STEPS), info.rank)
    return state(engine)


def case(stage: str, overrides: list[str], out: Path, info) -> dict:
    cfg = load_config(overrides=[*overrides, f"dist.ds_config={stage}"])
    paged = load_config(overrides=[*overrides, f"dist.ds_config={stage}", "optim.master_weights=paged"])
    row: dict = {"stage": stage, "rank": info.rank}
    reference = build(cfg, info)
    row["reference_losses"] = train(reference, range(STEPS), info.rank)
    reference_state = state(reference)
    del reference
    moved_state = moved_run(paged, info, out / f"ckpt-{stage}", row)
    row["moved_equals_reference"] = same(moved_state, reference_state)
    row["resumed_equals_moved"] = same(resumed_run(paged, info, out / f"ckpt-{stage}", row), moved_state)
    return row


def main() -> None:
    out, stages, overrides = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
    info = dist.init()
    rows = [case(stage, overrides, out, info) for stage in stages]
    everyone = dist.gather_objects(rows)
    if info.is_main:
        (out / "paged_masters.json").write_text(json.dumps([r for rank_rows in everyone for r in rank_rows]))
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
    dist.leave(0)  # see compat.exit_without_finalization
