"""GPU check of the DeepSpeed-ranks issue, one command, one short table at the end.

(a) trains the LLaMA-7B shape (random weights, NF4 + double quant, LoRA r=64 on all linear layers, paged
    AdamW 32-bit, activation checkpointing, full 512-token rows) on one rank under ZeRO-2 (and ZeRO-3)
    for a few steps; prints tokens/s and peak allocated GPU memory beside the reference stack's numbers
    measured on an H100 (../shared/RECIPE.md);
(b) loads the LLaMA-65B shape layer by layer through qlora_dist.model.loader (ZeRO-3 path, one rank) and
    prints the peak allocated GPU memory while loading against NF4 size + one bf16 layer + 2 GB.

Each case runs in its own process so that one case's memory peak does not leak into the next.
Usage on the device machine (after installing the carried wheels):  python bench/gpu_ranks.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Reference stack (transformers + peft + bitsandbytes, one H100, ../shared/RECIPE.md): tokens/s, GB.
REFERENCE = {("7b", 16): (5452, 11.7), ("7b", 32): (5604, 19.3)}
DS_PROBE = {("7b", 16, "zero2"): (7344, 9.7), ("7b", 32, "zero2"): (7908, 14.7), ("7b", 16, "zero3"): (3469, 10.9)}
SEQ = 512


def _device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"  # CPU: only to smoke-test this script


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak() -> int:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def _allocated() -> int:
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def _planned(cfg, size: str, batch: int) -> dict:
    """The planner's items for this very run (GB), to print beside what the allocator saw."""
    from qlora_dist import memory

    shape = memory.Shape.from_hf(_llama_config(size))
    plan = memory.make_plan(memory.setup_from_config(cfg, 1, shape, micro_batch=batch, on_gpu=True))
    return {"total_gb": plan.total / 1e9, **{k: v / 1e9 for k, v in plan.items.items()}}


def _llama_config(size: str):
    from transformers import LlamaConfig

    from qlora_dist.recipe import LLAMA_SHAPES, LlamaShape

    s = LLAMA_SHAPES.get(size) or LlamaShape(256, 512, 2, 4, 1000)  # 'smoke': a CPU check of the script
    return LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                       num_attention_heads=s.heads, num_key_value_heads=s.heads, vocab_size=s.vocab,
                       max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def _cfg(batch: int, stage: str, size: str = "7b"):
    from qlora_dist.config import load_config

    return load_config(preset=f"{size if size in ('7b', '13b', '33b', '65b') else '7b'}-all", overrides=[
        "model.path=random", f"train.global_batch_size={batch}", f"train.micro_batch_size={batch}",
        f"dist.ds_config={stage}", "train.max_steps=100"])


def case_train(size: str, batch: int, stage: str, steps: int = 6, warmup: int = 2) -> dict:
    import torch

    from qlora_dist import compat

    from qlora_dist.launch import dist
    from qlora_dist.train.engine import build_ds_config, initialize
    from qlora_dist.model.loader import RandomSource, load_layerwise
    from qlora_dist.model.base import add_lora, prepare_for_training

    compat.quiet_known_warnings()
    cfg = _cfg(batch, stage, size)
    dist.init()
    ds = build_ds_config(cfg, 1)
    t0 = time.time()
    model = load_layerwise(_llama_config(size), RandomSource(), device=_device(),
                           ds_config=ds if stage.startswith("zero3") else None)
    load_s = time.time() - t0
    after_load = _allocated()
    model = add_lora(model, cfg, seed=0)
    prepare_for_training(model, cfg)
    engine = initialize(cfg, model, ds)
    after_init = _allocated()
    gen = torch.Generator(device=_device()).manual_seed(0)
    times, losses = [], []
    for step in range(warmup + steps):
        ids = torch.randint(0, model.config.vocab_size, (batch, SEQ), device=_device(), generator=gen)
        _sync()
        start = time.perf_counter()
        loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        engine.backward(loss)
        engine.step()
        _sync()
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    median = statistics.median(times)
    return {"case": f"train {size} {batch}x{SEQ} {stage}", "tokens_per_s": batch * SEQ / median,
            "step_s": median, "peak_gb": _peak() / 1e9, "load_s": load_s,
            "loss_first": losses[0], "loss_last": losses[-1], "ref": REFERENCE.get((size, batch)),
            "allocated_after_load_gb": after_load / 1e9, "allocated_after_init_gb": after_init / 1e9,
            "allocated_after_steps_gb": _allocated() / 1e9, "planned": _planned(cfg, size, batch),
            "probe": DS_PROBE.get((size, batch, stage))}


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
    from qlora_dist.launch import dist
    from qlora_dist.train.engine import build_ds_config
    from qlora_dist.model.loader import RandomSource, load_layerwise

    compat.quiet_known_warnings()
    cfg = _cfg(1, "zero3")
    dist.init()
    peaks = []
    config = _llama_config(size)
    t0 = time.time()
    model = load_layerwise(config, RandomSource(), device=_device(), ds_config=build_ds_config(cfg, 1),
                           on_piece=lambda name: peaks.append(_peak()))
    load_s = time.time() - t0
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
