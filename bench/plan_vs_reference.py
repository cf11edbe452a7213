"""The planner's totals for the reference configurations of ../shared/RECIPE.md, beside the reference
stack's measured peaks (transformers + peft + bitsandbytes, one H100) and our trainer's measured peaks
(bench/results/gpu_memory_*.json, where that configuration was run).

    python bench/plan_vs_reference.py

The layouts differ: our trainer keeps fp32 master weights and fp32 gradients of the LoRA weights in
DeepSpeed's ZeRO optimizer (+12 bytes per LoRA weight), where the reference stack trains bf16 LoRA weights
in place; the reference's paged optimizer states are outside the allocator in both.
"""
from __future__ import annotations

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qlora_dist import memory  # noqa: E402

REFERENCE = [("7b", 4, True, 5.9), ("7b", 16, True, 11.7), ("7b", 32, True, 19.3), ("7b", 8, False, 50.7),
             ("65b", 1, True, 36.6), ("65b", 4, True, 40.5), ("65b", 8, True, 47.1)]


def ours_measured() -> dict:
    found = {}
    for path in glob.glob(os.path.join(os.path.dirname(__file__), "results", "gpu_memory_*.json")):
        for r in json.load(open(path)):
            if "peak_gb" in r:
                size, shape = r["case"].split()[1:3]
                found[(size, int(shape.split("x")[0]))] = r["peak_gb"]
    return found


def main() -> None:
    measured = ours_measured()
    print(f"{'shape':<6}{'batch':>7}{'ckpt':>6}{'planned':>10}{'reference':>11}{'diff':>8}{'ours measured':>15}")
    for size, batch, ckpt, ref in REFERENCE:
        dropout = 0.1 if size in ("7b", "13b") else 0.05
        s = memory.Setup(shape=memory.Shape.llama(size), micro_batch=batch, seq_len=512, checkpointing=ckpt,
                         lora_dropout=dropout > 0)
        total = memory.make_plan(s).total / 1e9
        ours = measured.get((size, batch)) if ckpt else None
        print(f"{size:<6}{batch:>4}x512{'yes' if ckpt else 'no':>6}{total:>9.1f}G{ref:>10.1f}G"
              f"{100 * (total - ref) / ref:>+7.0f}%{(f'{ours:.1f}G' if ours else '-'):>15}")


if __name__ == "__main__":
    main()
