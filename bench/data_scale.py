"""Data at scale (issue 15, item 5): build the tokenized-data cache of a large generated Alpaca-like file
through the real code path (`corpus.cached_rows`, as rank 0 of a run does) and print rows/s, the peak RSS
of the building process and the cache's bytes per token.

    python bench/data_scale.py --rows 1000000                     # tiny-llama's tokenizer, then SmolLM2's
    python bench/data_scale.py --rows 1000000 --tokenizers tiny-llama --packing

The file is generated once per (rows, seed) under .cache/data_scale/ and reused. Each build runs in its
own process (`--build`), so its VmHWM (peak resident memory, from /proc/self/status) is the build's alone.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("QLORA_DIST_CACHE", str(REPO / ".cache" / "models"))
os.environ.setdefault("HF_DATASETS_CACHE", str(REPO / ".cache" / "hf_datasets"))

# Syllables that make English-looking words: the tokenizers split them into few tokens, as real text.
SYLLABLES = ("the an in on re er ing ed es al is at or ar en ion ent ter con pro com per ver for sta "
             "ple ture ment able ous ness tion ly un de dis pre sub inter trans form port act gen "
             "struct duce vis spec tract mit pose graph log phon bio geo ther mar cap").split()


def alpaca_like(n: int, seed: int):
    """`n` records shaped as Alpaca's (instruction, input empty 60% of the time, output), ~430 bytes each
    as JSON (the issue's 300,000-row file: 129 MB)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(3000)]

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    for _ in range(n):
        yield {"instruction": text(5, 20), "input": text(5, 25) if rng.random() < 0.4 else "",
               "output": text(12, 62)}


def data_file(rows: int, seed: int) -> Path:
    path = REPO / ".cache" / "data_scale" / f"alpaca_like_{rows}_{seed}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            for record in alpaca_like(rows, seed):
                fh.write(json.dumps(record) + "\n")
        tmp.replace(path)
    return path


def peak_rss_gb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 2**20


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the tokenizing workers)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def build(data: Path, model: str, cache: Path, overrides: list[str]) -> dict:
    """One cache build, in this process, as rank 0 of a one-rank run builds it."""
    from qlora_dist.config import load_config
    from qlora_dist.data.corpus import cached_rows
    from qlora_dist.dist import DistInfo
    from qlora_dist.model.base import load_tokenizer
    from qlora_dist.model.builtin import resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(model))
    cfg = load_config(overrides=[f"data.dataset={data}", f"model.path={model}", *overrides])
    shutil.rmtree(cache, ignore_errors=True)
    cpu_before, start = cpu_seconds(), time.perf_counter()
    rows, report = cached_rows(cfg, tokenizer, DistInfo(0, 0, 1), cache)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_before
    tokens = sum(rows.lengths())
    size = sum(f.stat().st_size for f in Path(report["cache"]).rglob("*") if f.is_file())
    return {"model": model, "records": report["records"], "rows": len(rows), "seconds": round(seconds, 1),
            "records_per_s": round(report["records"] / seconds), "peak_rss_gb": round(peak_rss_gb(), 2),
            "worker_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
            "cpu_s": round(cpu, 1), "records_per_cpu_s": round(report["records"] / cpu),
            "tokens": tokens, "cache_mb": round(size / 1e6, 1), "bytes_per_token": round(size / tokens, 2),
            "vocab": len(tokenizer), "overrides": overrides}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizers", default="tiny-llama,smollm2")
    p.add_argument("--packing", action="store_true")
    p.add_argument("--build", nargs=3, metavar=("DATA", "MODEL", "CACHE"), help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="more key=value config overrides")
    args = p.parse_args()
    overrides = [*args.overrides, *(["data.packing=true"] if args.packing else [])]
    if args.build:
        data, model, cache = args.build
        print("RESULT " + json.dumps(build(Path(data), model, Path(cache), overrides)), flush=True)
        return
    start = time.perf_counter()
    data = data_file(args.rows, args.seed)
    print(f"data: {data} ({data.stat().st_size / 1e6:.0f} MB, generated or reused in "
          f"{time.perf_counter() - start:.0f} s); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    for model in args.tokenizers.split(","):
        cache = REPO / ".cache" / "data_scale" / f"cache-{model}"
        proc = subprocess.run([sys.executable, __file__, "--build", str(data), model, str(cache), *overrides],
                              capture_output=True, text=True, timeout=3600)
        result = next((line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
        if proc.returncode or result is None:
            print(f"{model}: build failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            continue
        r = json.loads(result)
        print(f"{model} (vocab {r['vocab']:,}): {r['records']:,} records -> {r['rows']:,} rows, {r['tokens']:,} "
              f"tokens in {r['seconds']} s = {r['records_per_s']:,} records/s ({r['cpu_s']} CPU-s in all processes: {r['records_per_cpu_s']:,} records per CPU-s); peak "
              f"RSS {r['peak_rss_gb']} GB (largest tokenizing worker {r['worker_peak_rss_gb']} GB); "
              f"cache {r['cache_mb']:,} MB = {r['bytes_per_token']} bytes/token")
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
