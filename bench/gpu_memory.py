"""GPU check of the memory planner: predicted vs measured torch.cuda.max_memory_allocated of our Trainer
(bench/gpu_ranks.py's train case: the Trainer itself on `model.path=random:<size>`; one rank, ZeRO-2,
NF4 + LoRA r=64, paged AdamW 32-bit, activation checkpointing, full 512-token rows) for 7B at 4x512 and
32x512 and 65B at 1x512 and 8x512. Target: +-10%.

    python bench/gpu_memory.py          (on the device machine, after installing the carried wheels)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_ranks import REPO  # noqa: E402,F401  (puts the repository on sys.path)

CASES = [("7b", 4), ("7b", 32), ("65b", 1), ("65b", 8)]
SMOKE = [("smoke", 2), ("smoke", 4)]


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['case']:<26} FAILED: {r['error'][-400:]}"
    p = r["planned"]
    static = sum(v for k, v in p.items() if not k.startswith(("activations", "total", "cuda", "zero_buckets")))
    err = (p["total_gb"] - r["peak_gb"]) / max(r["peak_gb"], 1e-9)
    return (f"{r['case']:<26} planned {p['total_gb']:6.1f} GB  measured peak {r['peak_gb']:6.1f} GB  "
            f"({100 * err:+5.1f}%) | static planned {static:5.1f} vs after setup {r['allocated_after_setup_gb'] or 0:5.1f} "
            f"| {r['tokens_per_s']:,.0f} tok/s")


def main() -> None:
    import torch

    out = os.environ.get("OUT", ".")
    cases = CASES if torch.cuda.is_available() else SMOKE
    rows = []
    for i, (size, batch) in enumerate(cases):
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(29700 + i)}
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_ranks.py"),
               "--case", "train", size, str(batch), "zero2"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        got = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        rows.append(json.loads(got[-1][7:]) if got else {"case": f"{size} {batch}x512", "error": proc.stderr[-2000:]})
        print(_row(rows[-1]), flush=True)
    with open(os.path.join(out, "gpu_memory.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print("\n" + "\n".join(_row(r) for r in rows))


if __name__ == "__main__":
    main()
