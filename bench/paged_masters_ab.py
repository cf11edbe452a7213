"""optim.master_weights=paged against DeepSpeed's own layout (gpu), on the product's Trainer at the 7B shape
(random weights, bench/trainer_run.py): 5 steps each, each side in its own process, both deterministic. Per
side: the allocator peak of the training steps (max_memory_allocated, reset after set-up; set-up's own peak
apart), the allocator after set-up, the bytes moved into paged (unified) memory and the paged optimizer bytes,
step time and the loss per step. Checks that the losses are equal and that the steps' peak drops by about the
planned fp32 master bytes (memory.py). One JSON into --out (issue 14, item 2; the CUDA half of
tests/test_paged_masters.py, which proves the mechanics on CPU).

  python bench/paged_masters_ab.py --out $OUT                  # one GPU
  python bench/paged_masters_ab.py --dry-run --out /tmp/x      # CPU: the gpu side on a tiny shape; paged skipped
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_run import launch, run_job  # noqa: E402  (also puts the repository on sys.path)

SIDES = ("gpu", "paged")
TOLERANCE = 0.15  # of the planned master bytes: the allocator rounds, DeepSpeed's set-up buffers come and go


def job(side: str, dry_run: bool) -> dict:
    model, preset, seq = ("random:smoke", None, 64) if dry_run else ("random:7b", "7b-all", 512)
    return {"model": model, "preset": preset, "batch": 4, "seq": seq, "rows": 32, "warmup": 1,
            "steps": 1 if dry_run else 4, "checkpointing": True,
            "extra": [f"optim.master_weights={side}"]}


def planned_master_bytes(j: dict) -> int:
    """The planner's master_weights_fp32 for this job's config, on a GPU (one rank)."""
    from qlora_dist import memory
    from qlora_dist.config import load_config
    from trainer_run import bench_overrides

    overrides = bench_overrides(j["model"], j["batch"], j["seq"], 1, "rows.jsonl", "out", j["checkpointing"], None)
    cfg = load_config(None, j["preset"], overrides + ["optim.master_weights=gpu"])
    return memory.lora_items(memory.setup_from_config(cfg, 1, on_gpu=True))[0]["master_weights_fp32"]


def run_side(j: dict) -> dict:
    """In the job's process: the Trainer run (trainer_run.run_job), observing how many bytes
    paged_masters.apply moved and what bitsandbytes paged."""
    import torch

    from qlora_dist.train import engine, paged_masters
    from qlora_dist.train.trainer import Trainer

    # Both sides deterministic (cuBLAS workspace, attention backward), so that equal losses mean equal steps.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    moved, apply = [], paged_masters.apply

    def observed(*args, **kwargs) -> int:
        moved.append(apply(*args, **kwargs))
        return moved[-1]

    paged_masters.apply = observed  # observes only: engine.initialize's call runs unchanged
    setup_peak, train = [], Trainer.train

    def train_from_a_fresh_peak(self) -> None:
        """The peak that the masters' move lowers is the training steps': set-up's (when the masters were still
        in the allocator) is kept apart, and the steps' records then carry the steps' own peak."""
        if torch.cuda.is_available():
            setup_peak.append(torch.cuda.max_memory_allocated() / 1e9)
            torch.cuda.reset_peak_memory_stats()
        train(self)

    Trainer.train = train_from_a_fresh_peak
    result = run_job(j)
    return {**result, "setup_peak_gb": setup_peak[0] if setup_peak else None,
            "paged_masters_gb": sum(moved) / 1e9, "paged_optimizer_gb": engine.paged_optimizer_gb()}


def compare(results: dict, planned: int) -> dict:
    gpu, paged = results["gpu"], results.get("paged", {})
    if "error" in gpu or "error" in paged or "skipped" in paged:
        return {"ok": False if "error" in gpu or "error" in paged else None}
    drop = gpu["peak_gb"] - paged["peak_gb"]
    after_setup = gpu["allocated_after_setup_gb"] - paged["allocated_after_setup_gb"]
    diff = max(abs(a - b) for a, b in zip(gpu["losses"], paged["losses"]))
    return {"losses_equal": gpu["losses"] == paged["losses"], "max_loss_diff": diff, "peak_drop_gb": round(drop, 3),
            "after_setup_drop_gb": round(after_setup, 3), "planned_master_gb": planned / 1e9,
            "ok": gpu["losses"] == paged["losses"] and abs(drop * 1e9 - planned) <= TOLERANCE * planned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU: the gpu side on a tiny shape")
    parser.add_argument("--timeout-s", type=float, default=300, help="both sides together")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--job", help=argparse.SUPPRESS)  # one side, in its own process (trainer_run.launch)
    ns = parser.parse_args()
    if ns.job:
        from qlora_dist import compat

        compat.set_library_env()
        compat.quiet_known_warnings()
        print("RESULT " + json.dumps(run_side(json.loads(ns.job))), flush=True)
        return
    import torch

    deadline, results = time.time() + ns.timeout_s, {}
    planned = planned_master_bytes(job("gpu", ns.dry_run))
    for side in SIDES:
        if side == "paged" and not torch.cuda.is_available():
            results[side] = {"skipped": "paged (unified) memory exists only on CUDA GPUs; this machine has none"}
            continue
        left = deadline - time.time()
        results[side] = launch(job(side, ns.dry_run), left / (len(SIDES) - SIDES.index(side)), script=__file__)
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)",
              "sides": results, **compare(results, planned)}
    os.makedirs(ns.out, exist_ok=True)
    with open(os.path.join(ns.out, "paged_masters_ab.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(json.dumps({k: v for k, v in report.items() if k != "sides"}, default=str))
    sys.exit(0 if report["ok"] is not False else 1)


if __name__ == "__main__":
    main()
