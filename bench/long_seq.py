"""Long samples on CPU (issue 28): memory and step time against the row length for each long-sample option,
on a 2-layer random model of SmolLM2-135M's width (hidden 576, MLP 1536, 9 heads, 3 KV heads, vocab
49,152, tied), NF4 base, bf16 compute, micro batch 1 (one unpadded row: no attention mask), one thread.

The product runs: qlora-dist's Trainer (bench/trainer_run.py's rows of random words cut to full length),
each (option, length) in a fresh process. Per run it reports the trainer's step time (the second step), and
the CPU allocator's peak over the first step above its level when the step began (torch's profiler records
every allocation and free: what the planner models, as tests/test_planner_gaps.py measures it), beside the
planner's figure for the same (memory.make_plan on the run's own config): what a step allocates and frees,
its activation items and ZeRO-2's reduce bucket (allocated at the step's first gradient; the optimizer
states the first step creates come after the backward has freed both, and stay). On a CPU `offload` moves nothing (DeepSpeed's hook skips host
tensors): its row shows the hook's cost, and the planner's GPU figure for it is not what a CPU holds.

    python bench/long_seq.py                          # 1k-8k, plain / offload / tiled; ~15 min on 2 cores
    python bench/long_seq.py --lengths 1024,2048 --options plain,tiled
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
sys.path.insert(0, str(REPO / "bench"))

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, bos_token_id=1,
             eos_token_id=2, pad_token_id=3, tie_word_embeddings=True)
# option -> overrides: each long-sample option alone, against checkpointing with neither
OPTIONS = {"plain": ["model.gradient_checkpointing=true", "model.tiled_mlp=off"],
           "offload": ["model.gradient_checkpointing=offload", "model.tiled_mlp=off"],
           "tiled": ["model.gradient_checkpointing=true", "model.tiled_mlp=on"]}


def write_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_dist.model.builtin import resolve_model_path

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE, dtype=torch.bfloat16)).to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model_path("tiny-llama")).save_pretrained(folder)
    return folder


def _allocator_peak(step) -> int:
    """Peak bytes the CPU allocator held above its level at the start, over one call of `step`."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak


def _planned(cfg) -> dict:
    from qlora_dist import memory

    plan = memory.make_plan(memory.setup_from_config(cfg, 1, on_gpu=False))
    acts = {k: v for k, v in plan.items.items() if k.startswith(("activations", "attention_mask", "zero_buckets"))}
    return {"planned_step_bytes": sum(acts.values()), "planned_items": acts,
            "planned_total_bytes": plan.total}


def run_job(job: dict) -> dict:
    """One Trainer run in this process: step 1 under the profiler (its allocator peak), step 2 timed."""
    import torch

    from trainer_run import bench_overrides, figures, synthetic_rows, write_rows

    from qlora_dist.config import load_config
    from qlora_dist.launch.job import prepare
    from qlora_dist.train.trainer import Trainer

    torch.set_num_threads(1)  # shared cores: one thread keeps a step's time from spinning at barriers
    folder = Path(tempfile.mkdtemp(prefix="qlora-longseq-"))
    data = write_rows(folder / "rows.jsonl", synthetic_rows(2, job["seq"]))
    overrides = bench_overrides(job["model"], 1, job["seq"], 2, data, folder / "out", True, None)
    cfg = load_config(None, None, [*overrides, *OPTIONS[job["option"]]])
    trainer = Trainer(cfg, prepare(cfg))
    peaks = []
    try:
        trainer.setup()
        step = trainer._train_step
        trainer._train_step = lambda: peaks.append(_allocator_peak(step)) if not peaks else step()
        trainer.train()
    finally:
        trainer.cleanup()
    got = figures(folder / "out" / "metrics.jsonl", 1, 1, job["seq"])
    return {"step_s": got["step_times"][-1], "first_step_s": got["step_times"][0], "full_rows": got["full_rows"],
            "measured_step_bytes": peaks[0], "losses": got["losses"], **_planned(trainer.cfg)}


def gpu_job(job: dict) -> dict:
    """One step of `job["model"]` (random:llama3-8b on the GPU) at `job["seq"]` tokens with the long-sample
    options on: the trainer's own peak GPU memory and step time, the process's peak host RSS, the plan."""
    from trainer_run import bench_overrides, figures, synthetic_rows, write_rows

    from qlora_dist import memory
    from qlora_dist.config import load_config
    from qlora_dist.launch.job import prepare
    from qlora_dist.train.trainer import Trainer

    folder = Path(tempfile.mkdtemp(prefix="qlora-longseq-gpu-"))
    data = write_rows(folder / "rows.jsonl", synthetic_rows(1, job["seq"]))
    overrides = bench_overrides(job["model"], 1, job["seq"], 1, data, folder / "out", True, None)
    cfg = load_config(None, None, [*overrides, *job["options"]])
    trainer = Trainer(cfg, prepare(cfg))
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    got = figures(folder / "out" / "metrics.jsonl", 0, 1, job["seq"])
    plan = memory.make_plan(memory.setup_from_config(trainer.cfg, 1, on_gpu=True))
    host_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))
    return {"step_s": got["step_times"][0], "gpu_peak_gb": got["peak_gb"], "peak_kind": got["peak_kind"],
            "full_rows": got["full_rows"], "host_peak_rss_gb": host_kb / 1e6, "planned_gpu_gb": plan.total / 1e9,
            "planned_host_gb": memory.host_training_bytes(plan) / 1e9, "planned_items": plan.items,
            "planned_outside": plan.outside}


def gpu_section(model: str, seq: int, options: list[str], out: Path, timeout: float) -> int:
    """bench/gpu_long_seq.sh's section: gpu_job in a fresh process, its JSON written at once; exit 3 on OOM."""
    job = {"model": model, "seq": seq, "options": options}
    cmd = [sys.executable, __file__, "--gpu-job", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO),
                                   "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
        got = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        result = json.loads(got[-1]) if got else {"error": proc.stderr[-3000:]}
    except subprocess.TimeoutExpired:
        result = {"error": f"timed out after {timeout:.0f} s"}
    oom = "out of memory" in result.get("error", "").lower() or "OutOfMemoryError" in result.get("error", "")
    out.write_text(json.dumps({**job, **result, "oom": oom}, indent=1))
    return 3 if oom else (1 if "error" in result else 0)


def run(model: Path, option: str, seq: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--job", json.dumps({"model": str(model), "option": option, "seq": seq})]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        return {"option": option, "seq": seq, "error": f"timed out after {timeout:.0f} s"}
    got = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not got:
        return {"option": option, "seq": seq, "error": proc.stderr[-2000:]}
    return {"option": option, "seq": seq, **json.loads(got[-1]), "wall_s": round(time.perf_counter() - start, 1)}


def _slopes(results: list[dict], key: str) -> dict[str, float]:
    """Per option: growth of `key` per 1k tokens from the shortest to the longest row measured."""
    out = {}
    for option in dict.fromkeys(r["option"] for r in results):
        rows = sorted((r for r in results if r["option"] == option and "error" not in r), key=lambda r: r["seq"])
        if len(rows) > 1:
            out[option] = (rows[-1][key] - rows[0][key]) / ((rows[-1]["seq"] - rows[0]["seq"]) / 1024)
    return out


def table(results: list[dict]) -> str:
    lines = ["| option | tokens | step s | allocator peak of a step, MB (measured) | planned, MB | planner error |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['option']} | {r['seq']:,} | error: {r['error'].strip().splitlines()[-1][:80]} |||")
            continue
        m, p = r["measured_step_bytes"] / 1e6, r["planned_step_bytes"] / 1e6
        lines.append(f"| {r['option']} | {r['seq']:,} | {r['step_s']:.2f} | {m:,.0f} | {p:,.0f} | {100 * (p - m) / m:+.1f}% |")
    measured, planned = _slopes(results, "measured_step_bytes"), _slopes(results, "planned_step_bytes")
    times = _slopes(results, "step_s")
    lines += ["", "| option | MB per 1k tokens (measured) | planned | step s per 1k tokens |", "|---|---|---|---|"]
    lines += [f"| {o} | {measured[o] / 1e6:.1f} | {planned[o] / 1e6:.1f} | {times[o]:.2f} |" for o in measured]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--gpu-job", help=argparse.SUPPRESS)
    parser.add_argument("--gpu-section", type=int, metavar="TOKENS", help="bench/gpu_long_seq.sh: one step of "
                        "--model at TOKENS with the options on, its JSON to --out")
    parser.add_argument("--model", default="random:llama3-8b")
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--timeout-s", type=float, default=400)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "long_seq_cpu.json"))
    args = parser.parse_args()
    from qlora_dist import compat

    compat.set_library_env()
    compat.quiet_known_warnings()
    if args.job or args.gpu_job:
        job = json.loads(args.job or args.gpu_job)
        print("RESULT " + json.dumps(run_job(job) if args.job else gpu_job(job)), flush=True)
        return
    if args.gpu_section:
        options = ["model.gradient_checkpointing=offload", "model.tiled_mlp=on"]
        sys.exit(gpu_section(args.model, args.gpu_section, options, Path(args.out), args.timeout_s))
    model = write_model(Path(tempfile.mkdtemp(prefix="qlora-longseq-model-")))
    start, loads, results = time.perf_counter(), [os.getloadavg()], []
    for seq in [int(s) for s in args.lengths.split(",")]:
        for option in args.options.split(","):
            results.append(run(model, option, seq, args.timeout_s))
            loads.append(os.getloadavg())
            print(json.dumps(results[-1]), flush=True)
    record = {"cpu": _cpu(), "load_averages": loads, "wall_s": round(time.perf_counter() - start), "results": results}
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(table(results))


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


if __name__ == "__main__":
    main()
