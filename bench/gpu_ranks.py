"""GPU check of the DeepSpeed-ranks issue, one command, one short table at the end.

(a) trains the LLaMA-7B shape with qlora-dist's own Trainer (bench/trainer_run.py: `model.path=random:7b`,
    the 7b-all preset — NF4 + double quant, LoRA r=64 on all linear layers, paged AdamW 32-bit, activation
    checkpointing — full 512-token rows) on one rank under ZeRO-2 (and ZeRO-3) for a few steps; prints
    tokens/s and peak allocated GPU memory from its metrics.jsonl beside the reference stack's numbers
    measured on an H100 (../shared/RECIPE.md);
(b) loads the LLaMA-65B shape layer by layer with the function the trainer loads `random:` weights with
    (qlora_dist.model.base.load_base_random; ZeRO-3 path, one rank) and prints the peak allocated GPU
    memory while loading against NF4 size + one bf16 layer + 2 GB.

Each case runs in its own process so that one case's memory peak does not leak into the next.
Usage on the device machine (after installing the carried wheels):  python bench/gpu_ranks.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_run import REPO, run_job  # noqa: E402,F401  (REPO: puts the repository on sys.path)

# Reference stack (transformers + peft + bitsandbytes, one H100, ../shared/RECIPE.md): tokens/s, GB.
REFERENCE = {("7b", 16): (5452, 11.7), ("7b", 32): (5604, 19.3)}
DS_PROBE = {("7b", 16, "zero2"): (7344, 9.7), ("7b", 32, "zero2"): (7908, 14.7), ("7b", 16, "zero3"): (3469, 10.9)}
SEQ = 512


def _device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"  # CPU: only to smoke-test this script


def _peak() -> int:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def _preset(size: str) -> str:
    return f"{size}-all" if size in ("7b", "13b", "33b", "65b") else "7b-all"  # 'smoke': the 7B recipe


def _cfg(batch: int, stage: str, size: str):
    from qlora_dist.config import load_config

    return load_config(None, _preset(size), [f"model.path=random:{size}", f"train.global_batch_size={batch}",
                                             f"train.micro_batch_size={batch}", f"dist.ds_config={stage}"])


def _planned(cfg, batch: int) -> dict:
    """The planner's items for this very run (GB), to print beside what the allocator saw."""
    from qlora_dist import memory

    plan = memory.make_plan(memory.setup_from_config(cfg, 1, micro_batch=batch, on_gpu=True))
    return {"total_gb": plan.total / 1e9, **{k: v / 1e9 for k, v in plan.items.items()}}


def case_train(size: str, batch: int, stage: str, steps: int = 6, warmup: int = 2) -> dict:
    """The Trainer on random:<size>, one rank; its figures, the plan and the reference's beside them."""
    job = {"model": f"random:{size}", "preset": _preset(size), "batch": batch, "seq": SEQ, "warmup": warmup,
           "steps": steps, "rows": batch * (warmup + steps), "checkpointing": True,
           "extra": [f"dist.ds_config={stage}"]}
    r = run_job(job)
    return {"case": f"train {size} {batch}x{SEQ} {stage}", **r, "loss_first": r["losses"][0],
            "loss_last": r["losses"][-1], "ref": REFERENCE.get((size, batch)),
            "planned": _planned(_cfg(batch, stage, size), batch), "probe": DS_PROBE.get((size, batch, stage))}


def _nf4_bytes(model) -> int:
    """Bytes the base holds on the GPU: packed weights, 16-bit weights, quantization constants."""
    total = 0
    for p in model.parameters():
        total += getattr(p, "ds_numel", p.numel()) * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * qs.code.element_size()
            if qs.state2 is not None:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
                total += qs.state2.code.numel() * qs.state2.code.element_size()
    return total


def case_load(size: str) -> dict:
    from qlora_dist import compat
    from qlora_dist import dist
    from qlora_dist.model.base import load_base_random
    from qlora_dist.model.builtin import random_llama_config
    from qlora_dist.train.engine import build_ds_config

    compat.quiet_known_warnings()
    cfg = _cfg(1, "zero3", size)
    dist.init()
    peaks = []
    t0 = time.time()
    model = load_base_random(size, cfg, _device(), build_ds_config(cfg, 1), on_piece=lambda name: peaks.append(_peak()))
    load_s = time.time() - t0
    config = random_llama_config(size)
    layer = model.model.layers[0]
    layer_bf16 = sum(getattr(p, "ds_numel", p.numel()) for p in layer.parameters()) * 2
    # Params4bit counts packed elements: 4 bits per weight, so numel x 2 bytes (bf16 storage) / 4 weights.
    layer_weights = (4 * config.hidden_size ** 2 + 3 * config.hidden_size * config.intermediate_size) * 2
    nf4 = _nf4_bytes(model)
    peak = _peak()
    target = nf4 + layer_weights + 2e9
    return {"case": f"load {size} layer-wise (ZeRO-3 path)", "peak_gb": peak / 1e9, "nf4_gb": nf4 / 1e9,
            "layer_bf16_gb": layer_weights / 1e9, "target_gb": target / 1e9, "fits_target": peak <= target,
            "load_s": load_s, "packed_layer_gb": layer_bf16 / 1e9, "peak_after_half_gb": peaks[len(peaks) // 2] / 1e9}


CASES = [("train", "7b", 16, "zero2"), ("train", "7b", 32, "zero2"), ("train", "7b", 16, "zero3"), ("load", "65b")]


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['case']:<34} FAILED: {r['error'][-300:]}"
    if r["case"].startswith("train"):
        ref = f"{r['ref'][0]:>6,} tok/s {r['ref'][1]:>5.1f} GB" if r["ref"] else "-"
        probe = f"{r['probe'][0]:>6,} tok/s {r['probe'][1]:>5.1f} GB" if r["probe"] else "-"
        return (f"{r['case']:<34} {r['tokens_per_s']:>7,.0f} tok/s {r['peak_gb']:>6.1f} GB | reference {ref} | "
                f"DS probe {probe} | loss {r['loss_first']:.3f}->{r['loss_last']:.3f}")
    return (f"{r['case']:<34} peak {r['peak_gb']:.1f} GB vs target {r['target_gb']:.1f} GB (NF4 {r['nf4_gb']:.1f} + "
            f"layer {r['layer_bf16_gb']:.1f} + 2) -> {'OK' if r['fits_target'] else 'OVER'}; load {r['load_s']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", nargs="*")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    ns = parser.parse_args()
    if ns.case:  # one case, in this process
        from qlora_dist import compat

        compat.set_library_env()
        compat.quiet_known_warnings()
        kind, *args = ns.case
        result = case_train(args[0], int(args[1]), args[2]) if kind == "train" else case_load(args[0])
        print("RESULT " + json.dumps(result), flush=True)
        return
    import torch

    smoke = not torch.cuda.is_available()
    print(f"GPU: {'none (smoke test on CPU)' if smoke else torch.cuda.get_device_name(0)}; torch {torch.__version__}",
          flush=True)
    rows = []
    for case in ([("train", "smoke", 4, "zero2"), ("train", "smoke", 4, "zero3"), ("load", "smoke")] if smoke else CASES):
        cmd = [sys.executable, __file__, "--case", *map(str, case)]
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(29600 + len(rows))}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if lines:
            rows.append(json.loads(lines[-1][7:]))
        else:
            rows.append({"case": " ".join(map(str, case)), "error": proc.stderr[-2000:]})
        print(_row(rows[-1]), flush=True)
    with open(os.path.join(ns.out, "gpu_ranks.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print("\n" + "\n".join(_row(r) for r in rows))


if __name__ == "__main__":
    main()
