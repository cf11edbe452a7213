"""What lora.init=pissa / loftq cost while loading (README "Adapter variants"): the layer-wise load of a model in
NF4 with each start, CPU and wall seconds, one thread (CPU seconds move less with other jobs on shared cores).

  python bench/init_load_time.py                  # SmolLM2-135M, r=16, alpha=16
  python bench/init_load_time.py --model DIR --r 64
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--starts", default="default,pissa,loftq:1,loftq:2", help="default, pissa, loftq:T")
    ns = parser.parse_args()
    from qlora_dist.compat import quiet_known_warnings, set_library_env

    set_library_env()
    quiet_known_warnings()
    import torch
    from transformers import AutoConfig

    from qlora_dist.model.adapter_init import AdapterInit, scaling
    from qlora_dist.model.builtin import resolve_model_path
    from qlora_dist.model.loader import SafetensorsSource, load_layerwise

    torch.set_num_threads(1)
    path, out = resolve_model_path(ns.model), {}
    for start in ns.starts.split(","):
        method, _, steps = start.partition(":")
        init = None if method == "default" else AdapterInit(method, int(steps or 1), ns.r,
                                                            scaling(ns.alpha, ns.r, False), None)
        wall, cpu = time.perf_counter(), time.process_time()
        load_layerwise(AutoConfig.from_pretrained(path), SafetensorsSource(path), 4, "nf4", True, "bfloat16", init=init)
        out[start] = {"cpu_s": round(time.process_time() - cpu, 1), "wall_s": round(time.perf_counter() - wall, 1)}
        print(start, out[start], flush=True)
    print(json.dumps({"model": ns.model, "r": ns.r, "load_average": os.getloadavg(), "times": out}))


if __name__ == "__main__":
    main()
