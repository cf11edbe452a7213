"""qlora-dist's side of every benchmark: its own `Trainer`, run as a user runs it, with figures read from
the OUTPUT/metrics.jsonl it writes. A figure measured on a copy of the trainer's setup is not a figure of
the product, so the benches build nothing of ours by hand: they pick a config (`load_config` overrides,
e.g. `model.path=random:7b`) and data (rows of random words, each cut by tokenization to full length).

Each run is its own process (a clean memory peak):  python bench/trainer_run.py --job '<json>'
prints one `RESULT {json}` line; `launch(job, timeout)` runs that from a bench and returns the result.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


# ------------------------------------------------------------------------------------------------ data
def synthetic_rows(n: int, seq: int, seed: int = 0) -> list[dict]:
    """`n` input/output records of random lowercase words, the same for a given (n, seq, seed). Each side
    has 4 characters per token it must fill; random words make 1.1 (tiny-llama's BPE) to 1.8 (SmolLM2's)
    characters a token, so tokenization (BOS + source cut at seq // 2, target + EOS cut at the rest) gives
    every row exactly `seq` tokens. `figures` checks it from the trainer's token counts (full_rows)."""
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        words, chars = [], 0
        while chars < 4 * tokens:
            words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))))
            chars += len(words[-1]) + 1
        return " ".join(words)

    return [{"input": text(seq // 2), "output": text(seq - seq // 2)} for _ in range(n)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bench_overrides(model_path: str, batch: int, seq: int, steps: int, data: Path, out: Path,
                    checkpointing: bool, cap: str | None) -> list[str]:
    """What turns a training config into a bench run: full rows of `seq` tokens, all of them labelled (as
    the reference's token batches), one micro batch per step, a metrics record every step, no evaluation,
    one checkpoint (at the end: the trainer always saves its last step)."""
    return [f"model.path={model_path}", f"data.dataset={data}", "data.train_on_source=true",
            f"data.source_max_len={seq // 2}", f"data.target_max_len={seq - seq // 2}",
            f"train.global_batch_size={batch}", f"train.micro_batch_size={batch}",
            f"model.gradient_checkpointing={str(checkpointing).lower()}", f"train.max_steps={steps}",
            f"train.save_steps={steps}", "train.logging_steps=1", f"train.output_dir={out}",
            "eval.at_start=false", "eval.at_end=false", *([f"train.max_memory_per_gpu={cap}"] if cap else [])]


# ------------------------------------------------------------------------------------------ one run
def figures(metrics: Path, warmup: int, batch: int, seq: int) -> dict:
    """Median tokens/s and step time over the steps after warm-up, peak memory (the trainer's own:
    CUDA max allocated, or the process's peak RSS on CPU; loading included), the loss per step."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "event" not in r and "loss" in r]
    measured = steps[warmup:]
    peak_key = "gpu_peak_gb" if "gpu_peak_gb" in steps[-1] else "rss_peak_gb"
    tokens = {r["tokens"] for r in steps}
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in measured),
            "step_s": statistics.median(r["step_s"] for r in measured), "step_times": [r["step_s"] for r in steps],
            "peak_gb": max(r[peak_key] for r in steps), "peak_kind": peak_key, "losses": [r["loss"] for r in steps],
            "tokens_per_step": sorted(tokens), "full_rows": tokens == {batch * seq},
            "plan": next((r for r in rows if r.get("event") == "plan"), None), **_mfu(measured)}


def _mfu(measured: list[dict]) -> dict:
    """The trainer's own MFU (train/throughput.py), median over the measured steps; None without a peak."""
    values = [r["mfu"] for r in measured if r.get("mfu") is not None]
    return {"mfu": statistics.median(values) if values else None, "mfu_peak": measured[-1].get("mfu_peak"),
            "tokens_per_s_per_gpu": statistics.median(r["tokens_per_s_per_gpu"] for r in measured)}


def run_job(job: dict) -> dict:
    """One Trainer run in this process: setup, train, cleanup; then its figures."""
    import torch

    from qlora_dist.config import load_config
    from qlora_dist.launch.job import prepare
    from qlora_dist.train.trainer import Trainer

    if job.get("threads"):
        # With other jobs on the cores, OpenMP threads spin at barriers waiting for a descheduled peer: a
        # step ran 7x slower with 2 threads on 2 shared cores. One thread a side keeps a CPU ratio honest.
        torch.set_num_threads(job["threads"])
    folder = Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    rows = synthetic_rows(job["rows"], job["seq"], job.get("data_seed", 0))
    data = write_rows(folder / "rows.jsonl", rows)
    overrides = bench_overrides(job["model"], job["batch"], job["seq"], job["warmup"] + job["steps"], data,
                                folder / "out", job["checkpointing"], job.get("cap"))
    cfg = load_config(None, job.get("preset"), overrides + list(job.get("extra", [])))
    trainer, t0, after_setup = Trainer(cfg, prepare(cfg)), time.perf_counter(), None
    try:
        trainer.setup()
        setup_s = time.perf_counter() - t0
        after_setup = torch.cuda.memory_allocated() / 1e9 if torch.cuda.is_available() else None
        cpu_times = time_cpu_steps(trainer)
        trainer.train()
        saving = time_save(trainer, folder) if job.get("time_save") else {}
    finally:
        trainer.cleanup()
    result = figures(folder / "out" / "metrics.jsonl", job["warmup"], job["batch"], job["seq"])
    shutil.rmtree(folder)  # the final checkpoint: ~11 GB at 65B (LoRA weights and fp32 optimizer states)
    measured = cpu_times[job["warmup"]:]
    cpu = {"cpu_step_times": cpu_times, "cpu_step_s": statistics.median(measured) if measured else None}
    return {**result, **saving, **cpu, "setup_s": round(setup_s, 1), "allocated_after_setup_gb": after_setup}


def time_cpu_steps(trainer) -> list[float]:
    """This process's CPU seconds per training step (filled as the steps run). On cores shared with other
    jobs a one-thread step's CPU time moves far less with their load than its wall time does."""
    times, step = [], trainer._train_step

    def timed() -> None:
        start = time.process_time()
        step()
        times.append(time.process_time() - start)

    trainer._train_step = timed  # observes only: the trainer's own step runs unchanged
    return times


def time_save(trainer, folder: Path) -> dict:
    """The time of one save after training, as the trainer does it: the PEFT adapter export alone, then a
    whole checkpoint (engine state, RNG, adapter, records, manifest; it replaces the final one)."""
    from qlora_dist.train.checkpoint import export_adapter, folder_bytes

    start = time.perf_counter()
    export_adapter(trainer.engine.module, folder / "adapter_probe", trainer.zero_stage)
    exported = time.perf_counter()
    path = trainer.save()
    done = time.perf_counter()
    return {"adapter_export_s": round(exported - start, 2), "checkpoint_s": round(done - exported, 2),
            "adapter_bytes": folder_bytes(folder / "adapter_probe"), "checkpoint_bytes": folder_bytes(path)}


def launch(job: dict, timeout: float, script: str | None = None) -> dict:
    """`script --job JSON` (default: this file's `run_job`) in a fresh process; the job's fields plus the
    result it prints, or plus an `error`."""
    cmd = [sys.executable, script or os.path.abspath(__file__), "--job", json.dumps(job)]
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **os.environ}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {**job, "error": f"timed out after {timeout:.0f} s"}
    got = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if got:
        return {**job, **json.loads(got[-1])}
    return {**job, "error": f"exit {proc.returncode}: " + "\n".join(proc.stderr.strip().splitlines()[-15:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", required=True, help="JSON: model, batch, seq, rows, warmup, steps, checkpointing, "
                                                     "and optionally preset, cap, extra, threads, data_seed")
    job = json.loads(parser.parse_args().job)
    from qlora_dist import compat

    compat.set_library_env()
    compat.quiet_known_warnings()
    import torch

    from qlora_dist.errors import ConfigError

    try:
        result = run_job(job)
    except torch.OutOfMemoryError as exc:  # a figure too: this run does not fit
        result = {"error": f"out of memory: {str(exc).splitlines()[0][:200]}"}
    except ConfigError as exc:  # e.g. a plan over train.max_memory_per_gpu, refused before loading
        result = {"error": f"refused by the trainer: {str(exc)[:400]}"}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
