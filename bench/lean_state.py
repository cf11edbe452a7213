"""What each LoRA-state layout would plan at the 65B goals of issue 14 (item 2), from the planner's own items.

Today's layout (memory.lora_items): bf16 LoRA weights, fp32 gradients, fp32 masters in the allocator,
paged AdamW states outside it: 10 bytes per LoRA parameter on the GPU. Each candidate below moves items
between "in the allocator" and "outside it" (paged unified memory or host) or drops the master; everything
else of the plan (NF4 base, activations, buffers) is the planner's. Goals: 65B 8 x 512 on one rank planned
<= 47 GB; 65B ZeRO-3 on 2 x 24 GB with >= 2 GB to spare; fp32 gradients kept (accumulation and reduction).

  python bench/lean_state.py            # the table
  python bench/lean_state.py --curve    # 50 CPU steps: zero2_offload against zero2, beside two zero2 seeds
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qlora_dist import memory  # noqa: E402

GB = 1e9
# name -> (bytes per LoRA parameter in the allocator: weights, grads, masters; fp32 gradients?; what offers it)
LAYOUTS = {
    "today: bf16 weight + fp32 grad + fp32 master": ((2, 4, 4), True, "DeepSpeed ZeRO, bf16 mode"),
    "reference stack: bf16 weight + bf16 grad": ((2, 2, 0), False, "transformers Trainer, no ZeRO"),
    "bf16 master and grads (bf16.bf16_master_weights_and_grads)": ((2, 2, 2), False, "DeepSpeed 0.19.8 option"),
    "fp32 weight = master, fp32 grad": ((4, 4, 0), True, "ZeRO-3 fp32 mode (no clone); ZeRO-1/2 clone it"),
    "bf16 weight + fp32 grad, master paged": ((2, 4, 0), True, "not in DeepSpeed 0.19.8"),
    "bf16 weight; fp32 grad and master paged": ((2, 0, 0), True, "not in DeepSpeed 0.19.8"),
    "bf16 weight; fp32 grad and master on the host (offload_optimizer)": ((2, 0, 0), True,
                                                                         "DeepSpeed offload; AdamW on the CPU"),
}
CASES = {"65B 8x512, 1 rank, ZeRO-2, cap 48 GB (goal <= 47 GB)": (
             memory.Setup(memory.Shape.llama("65b"), micro_batch=8, seq_len=512), 47 * GB),
         "65B 1x512, 2 ranks, ZeRO-3, cap 24 GB (goal >= 2 GB spare)": (
             memory.Setup(memory.Shape.llama("65b"), world_size=2, zero_stage=3, micro_batch=1, seq_len=512),
             22 * GB)}


def table() -> None:
    for case, (setup, goal) in CASES.items():
        plan = memory.make_plan(setup)
        today = sum(v for k, v in plan.items.items() if k in ("lora_weights", "lora_grads_fp32", "master_weights_fp32"))
        rest = plan.total - today
        numel = sum(memory._part(x, setup.world_size) for x in memory.lora_numels(setup)) \
            if setup.zero_stage == 3 else sum(memory.lora_numels(setup)) / setup.world_size
        print(f"{case}: planner total today {plan.total / GB:.2f} GB, of which LoRA state {today / GB:.2f} GB; "
              f"{numel / 1e6:.0f} M LoRA parameters per rank")
        for name, ((w, g, m), fp32, where) in LAYOUTS.items():
            total = rest + numel * (w + g + m)
            verdict = "meets the goal" if total <= goal else f"{(total - goal) / GB:.2f} GB over the goal"
            print(f"  {name:<66} {w + g + m:>2} B/param  {total / GB:6.2f} GB  {verdict}"
                  f"{'' if fp32 else '  (gives up fp32 gradients)'}  [{where}]")



def curve(steps: int, model: str) -> None:
    """The Trainer's loss per step (bench/trainer_run.py) for today's layout with seeds 0 and 1 and for the
    offload layout with seed 0: the layout's difference beside the spread that the seed alone makes."""
    from trainer_run import launch

    runs = {}
    for name, extra in {"zero2 seed 0": [], "zero2 seed 1": ["train.seed=1"],
                        "zero2_offload seed 0": ["dist.ds_config=zero2_offload"]}.items():
        job = {"model": model, "batch": 8, "seq": 64, "rows": 64, "warmup": 0, "steps": steps,
               "checkpointing": False, "threads": 1, "extra": ["optim.lr=1e-3", "lora.r=8", *extra]}
        runs[name] = launch(job, 600)
        if "error" in runs[name]:
            sys.exit(f"{name}: {runs[name]['error']}")
    base = runs["zero2 seed 0"]["losses"]
    for name in ("zero2 seed 1", "zero2_offload seed 0"):
        diff = [abs(a - b) for a, b in zip(base, runs[name]["losses"])]
        print(f"|loss(zero2 seed 0) - loss({name})| over {len(diff)} steps: max {max(diff):.3g}, "
              f"mean {statistics.mean(diff):.3g}, last {diff[-1]:.3g}")
    print("losses, every 10th step: " + "; ".join(f"{n}: " + " ".join(f"{x:.4f}" for x in r["losses"][::10])
                                                 for n, r in runs.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--curve", action="store_true")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--model", default="tiny-llama")
    ns = parser.parse_args()
    curve(ns.steps, ns.model) if ns.curve else table()
