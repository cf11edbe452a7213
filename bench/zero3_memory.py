"""ZeRO-3 layer-wise loading on N CPU ranks: each rank's share of the NF4 base and its peak memory while
loading, against model size / N + largest layer + fixed overhead.

    python bench/zero3_memory.py [--model smollm2] [--ranks 1 2 4]

Runs `torchrun --nproc_per_node N` for each N and prints one table. Each rank measures its resident
memory just before loading (imports and process group done) and its peak while loading.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _anon_mb() -> float:
    """Private (anonymous) resident memory. File-backed pages of the mmapped safetensors file are left
    out: they are page cache the kernel drops under pressure, shared by every rank on the node."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1e3
    return 0.0


class PeakSampler(threading.Thread):
    """Samples private resident memory every 5 ms while loading; the kernel keeps no peak of it."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = _anon_mb(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, _anon_mb())
            time.sleep(0.005)

    def stop(self) -> float:
        self.running = False
        self.join()
        return max(self.peak, _anon_mb())


def worker(model_name: str) -> None:
    from qlora_dist import compat
    compat.set_library_env()
    compat.quiet_known_warnings()
    import torch

    from qlora_dist import dist
    from qlora_dist.config import load_config
    from qlora_dist.train.engine import build_ds_config
    from qlora_dist.model.base import load_base_layerwise
    from qlora_dist.model.builtin import resolve_model_path
    # Modules the loader imports on first use: imported now, so that "before" includes them.
    import bitsandbytes  # noqa: F401
    import deepspeed.runtime.zero.partition_parameters  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    info = dist.init()
    path = resolve_model_path(model_name)  # prepared before the ranks start (see main)
    cfg = load_config(overrides=[f"model.path={model_name}", "dist.ds_config=zero3",
                                 f"train.global_batch_size={info.world_size}", "train.micro_batch_size=1"])
    ds = build_ds_config(cfg, info.world_size)
    dist.barrier()
    before = _anon_mb()
    sampler = PeakSampler()
    sampler.start()
    model = load_base_layerwise(path, cfg, None, ds)
    peak = sampler.stop()
    total = held = quant_state = 0
    for p in model.parameters():
        total += p.ds_numel * p.element_size()
        held += p.ds_tensor.numel() * p.ds_tensor.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            quant_state += qs.absmax.numel() * qs.absmax.element_size()
            if qs.state2 is not None:
                quant_state += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    emb = model.model.embed_tokens.weight
    largest_layer = max(emb.ds_numel * 2, sum(p.ds_numel for p in model.model.layers[0].parameters()) * 2 * 4)
    row = {"rank": info.rank, "world": info.world_size, "total_mb": total / 1e6, "held_mb": held / 1e6,
           "quant_state_mb": quant_state / 1e6, "rss_before_mb": before, "peak_mb": peak,
           "load_delta_mb": peak - before, "largest_layer_mb": largest_layer / 1e6}
    for r in dist.gather_objects(row):
        if info.is_main:
            print("ROW " + json.dumps(r), flush=True)
    del torch
    dist.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ranks", nargs="*", type=int, default=[1, 2, 4])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--json", help="write the rows here")
    ns = parser.parse_args()
    if ns.worker:
        worker(ns.model)
        return
    from qlora_dist.model.builtin import resolve_model_path

    resolve_model_path(ns.model)
    rows = []
    for n in ns.ranks:
        from qlora_dist.dist import _free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={_free_port()}",
               __file__, "--worker", "--model", ns.model]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        got = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if not got:
            sys.exit(f"N={n} failed:\n{proc.stderr[-3000:]}")
        rows += got
    print(f"{'N':>2} {'rank':>4} {'held MB':>8} {'total/N':>8} {'share':>6} {'qstate':>7} {'before':>7} "
          f"{'peak':>7} {'delta':>7} {'bound':>7}")
    for r in rows:
        bound = r["total_mb"] / r["world"] + r["largest_layer_mb"] + 150
        print(f"{r['world']:>2} {r['rank']:>4} {r['held_mb']:>8.1f} {r['total_mb'] / r['world']:>8.1f} "
              f"{r['held_mb'] / r['total_mb']:>6.3f} {r['quant_state_mb']:>7.1f} {r['rss_before_mb']:>7.0f} "
              f"{r['peak_mb']:>7.0f} {r['load_delta_mb']:>7.0f} {bound:>7.0f}")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
