"""Does a tokenized-data cache build always end? (issue 23: 2 of 11 builds of 300,000 rows hung at random
right after "records read, validated and tokenized", in the pool's teardown.)

Runs `--builds` cache builds through the worker pool, each in its own process with a timeout, set up as
a trainer's rank 0 is when it builds the cache: the trainer's signal handlers installed (StopRequest, data
phase), a gloo process group of one joined, then `corpus.cached_rows` into a fresh cache
folder. Prints one line per build and the count of hangs (builds killed at the timeout).

    python bench/cache_build_loop.py --builds 30 --rows 24000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("QLORA_DIST_CACHE", str(REPO / ".cache" / "models"))
os.environ.setdefault("HF_DATASETS_CACHE", str(REPO / ".cache" / "hf_datasets"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build(data: str, cache: str) -> None:
    """One cache build as a trainer's rank 0 does it (what the child process runs)."""
    import torch

    from qlora_dist.config import load_config
    from qlora_dist.data import corpus
    from qlora_dist import dist
    from qlora_dist.model.base import load_tokenizer
    from qlora_dist.train.preempt import StopRequest

    stop = StopRequest()
    # the trainer's gloo group (its threads), without DeepSpeed's op build: a world of one
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{dist._free_port()}",
                                         rank=0, world_size=1)
    info = dist.read_env()
    stop.at("data")
    cfg = load_config(overrides=[f"data.dataset={data}", "model.path=tiny-llama"])
    rows, report = corpus.cached_rows(cfg, load_tokenizer(cfg.model.path), info, Path(cache))
    print(json.dumps({"rows": len(rows), "workers": corpus._Tokenizers(None, cfg, None).workers}))


def write_data(path: Path, rows: int) -> None:
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"instruction": f"Repeat the number {i} " * (1 + i % 7), "input": "",
                                "output": f"{i} " * (1 + i % 11)}) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--builds", type=int, default=30)
    ap.add_argument("--rows", type=int, default=24_000)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a build counts as hung")
    ap.add_argument("--build", nargs=2, metavar=("DATA", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        build(*args.build)
        return 0
    hangs = failures = 0
    with tempfile.TemporaryDirectory(prefix="cache-build-loop-") as tmp:
        data = Path(tmp) / "data.jsonl"
        write_data(data, args.rows)
        for k in range(args.builds):
            start = time.perf_counter()
            cmd = [sys.executable, __file__, "--build", str(data), str(Path(tmp) / f"cache{k}")]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
            try:
                out, err = proc.communicate(timeout=args.timeout)
                verdict = "ok" if proc.returncode == 0 else f"FAILED rc {proc.returncode}: {err.strip()[-300:]}"
                failures += proc.returncode != 0
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the build and its workers
                proc.communicate()
                verdict, out = f"HUNG (killed after {args.timeout:.0f} s)", ""
                hangs += 1
            print(f"build {k + 1:2d}/{args.builds}: {time.perf_counter() - start:5.1f} s  {verdict}  {out.strip()}",
                  flush=True)
    print(f"{args.builds} builds of {args.rows:,} rows: {hangs} hung, {failures} failed")
    return 1 if hangs or failures else 0


if __name__ == "__main__":
    sys.exit(main())
