"""Sequence parallelism on CPU (issue 24): peak memory per rank and tokens/s against the row length, for
dist.sequence_parallel=1 (one rank) and 2 (two ranks sharing each row), on a 2-layer random model of
SmolLM2-135M's width (hidden 576, MLP 1536, vocab 49,152) with 8 heads and 2 KV heads (SmolLM2's 9 and 3
do not divide by 2). The product runs: qlora-dist's Trainer under torchrun, rows of random words cut to
full length by bench/trainer_run.py's data, micro batch 1, NF4 base, the run's own metrics.

Per rank it reports what training added to the process's resident memory over what setup left (the
kernel's peak-RSS mark is reset after setup: /proc/self/clear_refs), the ratio of that to N=1's (goal
about 1/N), and the share of the step spent in DeepSpeed's all-to-all (deepspeed.comm.all_to_all_single,
timed around each call, forward and backward; it includes waiting for the other rank).

    python bench/seq_parallel.py                       # 1k, 2k, 4k tokens; N=1 and N=2; ~10 min on 2 cores
    python bench/seq_parallel.py --lengths 1024 --steps 2
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=49152, max_position_embeddings=8192, bos_token_id=1,
             eos_token_id=2, pad_token_id=3, tie_word_embeddings=True)


def write_model(folder: Path) -> Path:
    """Random weights of SHAPE (bf16) and tiny-llama's tokenizer (its 512 ids all index the embedding)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_dist.model.builtin import resolve_model_path

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE, dtype=torch.bfloat16)).to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model_path("tiny-llama")).save_pretrained(folder)
    return folder


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _time_all_to_all() -> list[float]:
    """Seconds of every deepspeed.comm.all_to_all_single call (Ulysses' exchange, looked up at call time)."""
    import deepspeed.comm as comm

    spent, inner = [], comm.all_to_all_single

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    comm.all_to_all_single = timed
    return spent


def rank_job(job: dict) -> None:
    """One rank of one run (under torchrun): the Trainer as `qlora-dist train` builds it, observed only."""
    from trainer_run import bench_overrides

    from qlora_dist.config import load_config
    from qlora_dist.launch.job import prepare
    from qlora_dist.train.trainer import Trainer

    folder, steps = Path(job["folder"]), job["warmup"] + job["steps"]
    overrides = bench_overrides(job["model"], 1, job["seq"], steps, folder / "rows.jsonl", folder / "out", False, None)
    cfg = load_config(None, None, [*overrides, f"dist.sequence_parallel={job['n']}", "model.fused_loss=true"])
    trainer = Trainer(cfg, prepare(cfg))
    try:
        trainer.setup()
        spent = _time_all_to_all()
        after_setup = _rss_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS mark restarts from here
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        peak = _rss_kb("VmHWM")
        result = {"rank": trainer.info.rank, "after_setup_gb": after_setup / 1e6, "train_peak_gb": peak / 1e6,
                  "added_gb": (peak - after_setup) / 1e6, "all_to_all_s": sum(spent),
                  "all_to_all_calls": len(spent), "train_s": seconds}
        (folder / f"rank-{trainer.info.rank}.json").write_text(json.dumps(result))
    finally:
        trainer.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model: Path, seq: int, n: int, warmup: int, steps: int, timeout: float) -> dict:
    from trainer_run import figures, synthetic_rows, write_rows

    folder = Path(tempfile.mkdtemp(prefix=f"qlora-sp-{seq}-{n}-"))
    write_rows(folder / "rows.jsonl", synthetic_rows(8, seq))
    job = {"folder": str(folder), "model": str(model), "seq": seq, "n": n, "warmup": warmup, "steps": steps}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={_free_port()}",
           __file__, "--rank-job", json.dumps(job)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # one thread a rank, N=1 too
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode:
        return {"seq": seq, "n": n, "error": proc.stderr[-2000:]}
    ranks = [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(n)]
    got = figures(folder / "out" / "metrics.jsonl", warmup, 1, seq)
    measured_steps = max(len(got["step_times"]), 1)
    share = max(r["all_to_all_s"] for r in ranks) / max(sum(got["step_times"]), 1e-9)
    return {"seq": seq, "n": n, "tokens_per_s": got["tokens_per_s"], "tokens_per_s_per_rank": got["tokens_per_s_per_gpu"],
            "step_s": got["step_s"], "full_rows": got["full_rows"], "losses": got["losses"],
            "added_gb_per_rank": max(r["added_gb"] for r in ranks), "after_setup_gb": ranks[0]["after_setup_gb"],
            "all_to_all_share": share, "all_to_all_calls_per_step": ranks[0]["all_to_all_calls"] / measured_steps,
            "wall_s": round(time.perf_counter() - start, 1)}


def _table(results: list[dict]) -> str:
    one = {r["seq"]: r for r in results if r["n"] == 1 and "error" not in r}
    lines = ["| tokens a row | N | step s | tokens/s (group) | tokens/s per rank | memory added per rank, GB | vs N=1 | all-to-all share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['seq']} | {r['n']} | error: {r['error'].splitlines()[-1][:80]} |||||")
            continue
        ratio = r["added_gb_per_rank"] / one[r["seq"]]["added_gb_per_rank"] if r["seq"] in one else float("nan")
        lines.append(f"| {r['seq']} | {r['n']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_per_rank']:.0f} | "
                     f"{r['added_gb_per_rank']:.3f} | {ratio:.2f} | {100 * r['all_to_all_share']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank-job", help=argparse.SUPPRESS)
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--sizes", default="1,2", help="dist.sequence_parallel values (ranks)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=400)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "seq_parallel_cpu.json"))
    args = parser.parse_args()
    from qlora_dist import compat

    compat.set_library_env()
    compat.quiet_known_warnings()
    if args.rank_job:
        rank_job(json.loads(args.rank_job))
        return
    model = write_model(Path(tempfile.mkdtemp(prefix="qlora-sp-model-")))
    results = []
    for seq in [int(s) for s in args.lengths.split(",")]:
        for n in [int(s) for s in args.sizes.split(",")]:
            results.append(run(model, seq, n, args.warmup, args.steps, args.timeout_s))
            print(json.dumps(results[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"cpu": _cpu(), "load": os.getloadavg(), "results": results}, indent=1))
    print(_table(results))


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


if __name__ == "__main__":
    main()
