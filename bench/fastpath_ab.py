"""A/B of each fast path on our side alone (issue 14, item 5): the Trainer (bench/trainer_run.py) with the
defaults, then each of `model.fused_loss`, `model.fused_lora`, `model.compile_kernels` flipped, in rounds
(A, B, C, D, A, B, ...) so that a change of load on shared cores spreads over all variants. Median step
time after warm-up per run (CPU seconds on a CPU, wall seconds on a GPU); the table gives each variant's median over rounds and its ratio to the default.

  python bench/fastpath_ab.py                       # SmolLM2-135M, 4 x 128, one thread, this CPU
  python bench/fastpath_ab.py --model random:7b --batch 8 --seq 512 --rounds 1    # one GPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_run import REPO, launch  # noqa: E402

VARIANTS = {"default": [], "fused_loss=false": ["model.fused_loss=false"],
            "fused_lora=false": ["model.fused_lora=false"], "compile_kernels=true": ["model.compile_kernels=true"],
            # adapter variants (README "Adapter variants"): not in the default set, name them with --variants
            "variant=dora": ["lora.variant=dora"], "rslora=true": ["lora.rslora=true"]}
DEFAULT_SET = "default,fused_loss=false,fused_lora=false,compile_kernels=true"
RECIPE = ["lora.r=64", "lora.alpha=16", "lora.dropout=0.1", "optim.lr=2e-4", "optim.max_grad_norm=0.3",
          "optim.name=paged_adamw_32bit", "optim.scheduler=constant", "optim.warmup_steps=0",
          "model.compute_dtype=bfloat16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="compile_kernels compiles in its first steps")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=DEFAULT_SET, help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--timeout-s", type=float, default=1500)
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    ns = parser.parse_args()
    deadline, load = time.time() + ns.timeout_s, os.getloadavg()
    names = ns.variants.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(ns.rounds):
        for name in names:
            job = {"model": ns.model, "batch": ns.batch, "seq": ns.seq, "rows": ns.batch * (ns.warmup + ns.steps),
                   "warmup": ns.warmup, "steps": ns.steps, "checkpointing": False, "threads": ns.threads,
                   "extra": RECIPE + VARIANTS[name]}
            r = launch(job, deadline - time.time())
            runs[name].append(r)
            print(f"{name:<22} " + (f"FAILED {r['error'][-300:]}" if "error" in r else
                                    f"step {r['step_s']:.3f} s (CPU {r['cpu_step_s']:.3f} s)  {r['tokens_per_s']:.1f} "
                                    f"tok/s  CPU s a step {[round(t, 2) for t in r['cpu_step_times']]}"),
                  flush=True)
    import torch

    key = "step_s" if torch.cuda.is_available() else "cpu_step_s"  # CPU: CPU seconds (trainer_run says why)
    base = statistics.median(r[key] for r in runs["default"] if "error" not in r) if "default" in runs else None
    table = {}
    for name, rs in runs.items():
        ok = [r[key] for r in rs if "error" not in r]
        table[name] = {"measure": key, "median": statistics.median(ok) if ok else None, "runs": ok,
                       "speedup_vs_default": base / statistics.median(ok) if ok and base else None}
        print(f"{name:<22} median {key} {table[name]['median']}; speed vs default "
              f"{table[name]['speedup_vs_default']}")
    from speed import _device_name

    device = _device_name(False)
    report = {"date": datetime.date.today().isoformat(), "device": device, "model": ns.model, "batch": ns.batch,
              "seq": ns.seq, "threads": ns.threads, "load_average_at_start": load, "load_average_at_end": os.getloadavg(),
              "table": table, "runs": runs}
    name = f"fastpath_ab_{device}_{ns.model.replace(':', '-')}_{report['date']}.json"
    for folder in filter(None, [ns.out, os.environ.get("OUT")]):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            json.dump(report, f, indent=2)
    print(f"written: {name}")


if __name__ == "__main__":
    main()
