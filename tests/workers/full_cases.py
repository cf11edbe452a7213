"""Run under torchrun: full fine-tuning (train.method=full) cases in one process group.

usage: full_cases.py OUT NAME:key=value,... ... -- key=value ...   (as tests/workers/train_cases.py; copy=FOLDER
  copies another case's checkpoint into OUT/NAME first, so the case resumes from it)
A case trains into OUT/NAME as usual (the model folder in OUT/NAME/model); rank 0 then writes
OUT/NAME/trained_logits.pt: the trained engine's logits on a fixed batch, computed by all ranks under the run's
ZeRO stage. A case whose name starts with `memory` trains no folder to its end: it records the peak of two
training steps (the engine's tensors when they start, plus the CPU allocator's peak above that: torch's
profiler, every allocation and free) and the planner's figure for the same run at the longest micro-batch it
saw, into OUT/NAME/memory.json (one row per rank).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _trainer(out: Path, overrides: list[str]):
    from qlora_dist.config import load_config
    from qlora_dist.launch.job import prepare
    from qlora_dist.train.trainer import Trainer

    cfg = load_config(overrides=[*overrides, f"train.output_dir={out}"])
    return Trainer(cfg, prepare(cfg))


def train_case(out: Path, overrides: list[str]) -> None:
    from qlora_dist import dist
    from qlora_dist.data.batches import collate

    trainer = _trainer(out, overrides)
    trainer.setup()
    trainer.train()
    batch = collate(trainer.rows[:4], trainer.tokenizer.pad_token_id)
    trainer.engine.eval()
    with torch.no_grad():
        logits = trainer.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    if dist.is_main():
        torch.save({"logits": logits, "batch": batch}, out / "trained_logits.pt")
    dist.barrier()
    trainer.cleanup()


def _allocator_peak(prof) -> int:
    """The highest sum of live bytes over the profiled span (frees are negative), above its start."""
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak


def _held_bytes(engine) -> int:
    """What the engine holds between steps, counted from its real tensors: each weight as this rank holds it
    (its ZeRO-3 partition), the fp32 masters, the fp32 gradient partitions, ZeRO-3's reduce bucket, and the
    optimizer's states (none before the first step)."""
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    opt = engine.optimizer
    total = sum(size(getattr(p, "ds_tensor", p.data)) for p in engine.module.parameters())
    total += sum(size(t) for t in opt.fp32_partitioned_groups_flat) + size(opt.grad_partitions_flat_buffer)
    total += sum(size(b.buffer) for b in opt.ipg_buckets.values() if b.buffer is not None)
    return total + sum(size(v) for st in opt.optimizer.state.values() for v in st.values() if torch.is_tensor(v))


def memory_case(out: Path, overrides: list[str]) -> None:
    """The planned peak of a training step against the measured one: what the engine holds when the steps
    start (its tensors) plus the CPU allocator's peak above that over two steps (the first creates the
    optimizer's states). The loading phase is not part of it (the layer-wise loader's own bound is checked
    by tests/test_zero3_memory.py)."""
    from dataclasses import replace

    from qlora_dist import dist, memory

    trainer = _trainer(out, overrides)
    trainer.setup()
    held = _held_bytes(trainer.engine)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as stepping:
        trainer._train_step()
        trainer._train_step()
    longest = max(max(len(trainer.rows[i].input_ids) for i in micro)
                  for step in (0, 1) for micro in trainer.schedule.micro_batches(step))
    setup = replace(memory.setup_from_config(trainer.cfg, trainer.info.world_size, on_gpu=False), seq_len=longest)
    plan = memory.make_plan(setup)
    row = {"rank": trainer.info.rank, "held_at_start": held, "step_peak": _allocator_peak(stepping),
           "measured_peak": held + _allocator_peak(stepping), "planned": plan.total, "items": plan.items,
           "seq_len": longest}
    rows = dist.gather_objects(row)
    if dist.is_main():
        (out / "memory.json").write_text(json.dumps(rows, indent=2))
    dist.barrier()
    trainer.cleanup()


def run_case(out: Path, overrides: list[str]) -> None:
    (memory_case if out.name.startswith("memory") else train_case)(out, overrides)


if __name__ == "__main__":
    from train_cases import run_as_script  # this folder is the script's: on sys.path

    run_as_script(run_case)
