"""Real-data throughput (issue 14, item 4): real rows of the seed's data at the recipe's lengths, real
(non-padding) tokens per second of qlora-dist against the reference stack as qlora.py runs it.

(a) reference: bench/speed.py's recipe stack (NF4 base, LoRA r=64 on all linear layers, checkpointing, bf16
    autocast, paged AdamW, plain loop), fed as qlora.py feeds it: the HF Trainer's `group_by_length`
    sampler (transformers' `get_length_grouped_indices`: mega-batches of 50 batches sorted by length) and
    DataCollatorForCausalLM's padding to the longest row of each batch; the source masked.
(b) qlora-dist: its own `Trainer` on the same file with `data.packing=true` (rows packed to
    source_max_len + target_max_len, no attention across examples) and its default fast paths.

Both read the same examples with qlora-dist's reader and tokenization (the data path is not what is
compared). Throughput = real tokens / seconds summed over the measured steps (steps differ in length: a
median would pick one). The reference's measured batches are spread evenly over its epoch's batch order
(its sampler puts the longest mega-batch first), so both sides see the file's length distribution.

  python bench/real_data.py                       # SmolLM2-135M, Alpaca + OASST1 questions, this CPU
  python bench/real_data.py --model tiny-llama    # the tiny random LLaMA, in seconds
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_run import REPO, launch  # noqa: E402  (also puts the repository on sys.path)

DATA = Path(REPO).parent / "shared" / "data"
# name -> (file, source_max_len, target_max_len): the recipe's lengths (../shared/RECIPE.md): Alpaca as
# "All" (384 + 128); OASST1 trained on the whole text (qlora.py: empty input, the text as output), 512.
DATASETS = {"alpaca": (DATA / "alpaca" / "alpaca_tiny.json", 384, 128),
            "oasst1": (DATA / "oasst_guanaco" / "oa_questions.jsonl", 16, 512)}


def dataset_file(name: str, folder: Path) -> Path:
    """Alpaca as it is; OASST1 questions as qlora.py's oasst1 rows: the whole exchange as the target."""
    path = DATASETS[name][0]
    if name != "oasst1":
        return path
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = folder / "oasst1_whole_text.jsonl"
    out.write_text("".join(json.dumps({"input": "", "output": f"{r['input']} {r['output']}"}) + "\n" for r in rows))
    return out


def common_overrides(job: dict) -> list[str]:
    _, source, target = DATASETS[job["dataset"]]
    return [f"model.path={job['model']}", f"data.dataset={job['file']}", f"data.source_max_len={source}",
            f"data.target_max_len={target}", "lora.r=64", "lora.alpha=16", "lora.dropout=0.1", "optim.lr=2e-4",
            "optim.max_grad_norm=0.3", "optim.name=paged_adamw_32bit", "optim.scheduler=constant",
            "optim.warmup_steps=0", "model.compute_dtype=bfloat16", f"train.global_batch_size={job['batch']}",
            "eval.at_start=false", "eval.at_end=false"]


# ------------------------------------------------------------------------------------------ qlora-dist
def run_ours(job: dict, folder: Path) -> dict:
    from qlora_dist.config import load_config
    from qlora_dist.launch.job import prepare
    from qlora_dist.train.trainer import Trainer

    steps = job["warmup"] + job["steps"]
    cfg = load_config(None, None, common_overrides(job) + [
        "data.packing=true", f"train.micro_batch_size={job['batch']}", f"train.max_steps={steps}",
        f"train.save_steps={steps}", "train.logging_steps=1", f"train.output_dir={folder / 'out'}", *job["ours"]])
    from trainer_run import time_cpu_steps

    trainer = Trainer(cfg, prepare(cfg))
    try:
        trainer.setup()
        cpu_times = time_cpu_steps(trainer)
        trainer.train()
    finally:
        trainer.cleanup()
    rows = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if "event" not in r and "loss" in r][job["warmup"]:]
    return {"tokens": sum(r["tokens"] for r in measured), "seconds": sum(r["step_s"] for r in measured),
            "cpu_seconds": sum(cpu_times[job["warmup"]:]), "padded_tokens": None,
            "losses": [r["loss"] for r in measured]}


# ------------------------------------------------------------------------------------------- reference
def reference_batches(job: dict, cfg):
    """qlora.py's batches: group_by_length order, right padding to the longest row of each batch."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from qlora_dist.data.batches import collate, tokenize_all
    from qlora_dist.data.corpus import read_examples
    from qlora_dist.model.base import load_tokenizer

    tokenizer = load_tokenizer(job["model"])
    rows = tokenize_all(read_examples(cfg)[0], tokenizer, cfg)
    order = get_length_grouped_indices([len(r.input_ids) for r in rows], job["batch"],
                                       generator=torch.Generator().manual_seed(cfg.train.seed))
    batches = [order[i:i + job["batch"]] for i in range(0, len(order) - job["batch"] + 1, job["batch"])]
    n = job["warmup"] + job["steps"]
    picked = [batches[round(i * (len(batches) - 1) / max(n - 1, 1))] for i in range(n)]  # spread over the epoch
    return [collate([rows[i] for i in b], tokenizer.pad_token_id) for b in picked]


def run_reference(job: dict) -> dict:
    import torch

    import speed
    from qlora_dist.config import load_config

    cfg = load_config(None, None, common_overrides(job) + ["model.gradient_checkpointing=true"])
    speed.SHAPES["real-data"] = {**speed.SHAPES["smollm2"], "model": job["model"]}  # a folder model, as SmolLM2
    step = speed.build_reference("real-data", torch.device("cpu"), cfg)
    tokens = seconds = cpu_seconds = padded = 0
    losses = []
    for i, batch in enumerate(reference_batches(job, cfg)):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step(batch))
        if i >= job["warmup"]:
            seconds += time.perf_counter() - start
            cpu_seconds += time.process_time() - cpu_start
            tokens += int(batch["attention_mask"].sum())
            padded += batch["input_ids"].numel()
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu_seconds, "padded_tokens": padded,
            "losses": losses[job["warmup"]:]}


def run_job(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])  # bench/trainer_run.py says why: one thread a side on shared cores
    with tempfile.TemporaryDirectory(prefix="qlora-realdata-") as tmp:
        out = run_ours(job, Path(tmp)) if job["side"] == "ours" else run_reference(job)
    return {**out, "tokens_per_s": out["tokens"] / out["seconds"], "tokens_per_cpu_s": out["tokens"] / out["cpu_seconds"]}


# ------------------------------------------------------------------------------------------- the driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 or tiny-llama")
    parser.add_argument("--datasets", default="alpaca,oasst1")
    parser.add_argument("--batch", type=int, default=4, help="rows a step on both sides (the recipe: 16)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--timeout-s", type=float, default=1500)
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    parser.add_argument("--job", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    from qlora_dist import compat

    compat.set_library_env()
    compat.quiet_known_warnings()
    if ns.job:
        print("RESULT " + json.dumps(run_job(json.loads(ns.job))), flush=True)
        return
    import speed

    deadline, load = time.time() + ns.timeout_s, os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="qlora-realdata-files-"))
    results = []
    for name in ns.datasets.split(","):
        for side in ("ref", "ours"):
            job = {"side": side, "dataset": name, "file": str(dataset_file(name, tmp)), "model": ns.model,
                   "batch": ns.batch, "warmup": ns.warmup, "steps": ns.steps, "threads": ns.threads, "ours": ns.ours}
            results.append(launch(job, deadline - time.time(), os.path.abspath(__file__)))
            r = results[-1]
            print(f"{name:<7} {'reference' if side == 'ref' else 'qlora-dist':<10} " + (
                f"FAILED: {r['error'][-400:]}" if "error" in r else
                f"{r['tokens_per_s']:8.1f} real tokens/s, {r['tokens_per_cpu_s']:8.1f} per CPU second "
                f"({r['tokens']} tokens in {r['seconds']:.1f} s, {r['cpu_seconds']:.1f} CPU s"
                + (f"; {r['padded_tokens']} with padding" if r["padded_tokens"] else "") + ")"), flush=True)
    ratios = {}
    for name in ns.datasets.split(","):
        ref, ours = (next(r for r in results if r["dataset"] == name and r["side"] == s) for s in ("ref", "ours"))
        if "error" in ref or "error" in ours:
            ratios[name] = None
            continue
        ratios[name] = {k: ours[k] / ref[k] for k in ("tokens_per_s", "tokens_per_cpu_s")}
        print(f"{name}: qlora-dist / reference = {ratios[name]['tokens_per_s']:.2f}x in wall time, "
              f"{ratios[name]['tokens_per_cpu_s']:.2f}x in CPU time")
    report = {"date": datetime.date.today().isoformat(), "device": f"cpu-{os.cpu_count()}cores",
              "cpu_model": speed._cpu_model(), "model": ns.model, "batch": ns.batch, "ours_config": ns.ours,
              "load_average_at_start": load, "load_average_at_end": os.getloadavg(), "results": results,
              "ratios": ratios}
    name = f"real_data_cpu-{os.cpu_count()}cores_{ns.model}_{report['date']}.json"
    for folder in filter(None, [ns.out, os.environ.get("OUT")]):
        os.makedirs(folder, exist_ok=True)
        Path(folder, name).write_text(json.dumps(report, indent=2))
    print(f"written: {name}")


if __name__ == "__main__":
    main()
