"""Adapter variants side by side (issue 27, item 4; README "Adapter variants"): LoRA, DoRA, rsLoRA at r=16 and
r=128, LoftQ and PiSSA starts, each trained by the real `Trainer` on SmolLM2-135M (the embedded default model,
NF4) on a built-in task over several seeds. Per variant: the final training loss (mean of the last 3 steps),
held-out exact match after training (the trainer's own eval at the end), and its step time relative to LoRA
(CPU seconds a step, which moves less with other jobs on shared cores than wall time, and wall seconds).

  python bench/adapter_variants.py                      # 6 variants x 3 seeds, 2 runs at a time, one thread each
  python bench/adapter_variants.py --variants lora,dora --seeds 1 --steps 10    # a quick look

Each run is its own process (bench/trainer_run.launch); the table is printed and written to bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_run import REPO, launch, time_cpu_steps  # noqa: E402

VARIANTS = {  # name -> lora.* overrides (alpha 16 throughout: the scaling is what rsLoRA changes)
    "lora r=16": ["lora.r=16"],
    "dora r=16": ["lora.r=16", "lora.variant=dora"],
    "rslora r=16": ["lora.r=16", "lora.rslora=true"],
    "rslora r=128": ["lora.r=128", "lora.rslora=true"],
    "loftq r=16": ["lora.r=16", "lora.init=loftq", "lora.init_iters=1"],
    "pissa r=16": ["lora.r=16", "lora.init=pissa"],
}
COMMON = ["model.path=smollm2", "data.dataset=builtin", "lora.alpha=16", "lora.dropout=0.05", "optim.lr=1e-3",
          "optim.scheduler=constant", "optim.warmup_steps=0", "model.compute_dtype=bfloat16",
          "model.gradient_checkpointing=false", "eval.at_start=false", "eval.at_end=true", "eval.max_new_tokens=8",
          "train.logging_steps=1"]


def run_job(job: dict) -> dict:
    """One Trainer run in this process (called by trainer_run's --job protocol through this file)."""
    import torch

    from qlora_dist.config import load_config
    from qlora_dist.launch.job import prepare
    from qlora_dist.train.trainer import Trainer

    torch.set_num_threads(job["threads"])
    out = Path(tempfile.mkdtemp(prefix="qlora-variants-")) / "out"
    cfg = load_config(overrides=[*COMMON, *VARIANTS[job["variant"]], f"data.tasks=[{job['task']}]",
                                 f"data.num_train={job['batch'] * job['steps']}", f"data.num_eval={job['eval']}",
                                 f"train.global_batch_size={job['batch']}", f"train.micro_batch_size={job['batch']}",
                                 f"train.max_steps={job['steps']}", f"train.save_steps={job['steps']}",
                                 f"train.seed={job['seed']}", f"train.output_dir={out}"])
    trainer, start = Trainer(cfg, prepare(cfg)), time.perf_counter()
    try:
        trainer.setup()
        setup_s = time.perf_counter() - start
        cpu = time_cpu_steps(trainer)
        trainer.train()
    finally:
        trainer.cleanup()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "event" not in r and "loss" in r]
    evals = [r["builtin"]["mean"]["accuracy"] for r in rows if r.get("event") == "eval"]
    return {"losses": [r["loss"] for r in steps], "exact_match": evals[-1] if evals else None,
            "cpu_step_s": statistics.median(cpu[1:]), "wall_step_s": statistics.median(r["step_s"] for r in steps[1:]),
            "setup_s": round(setup_s, 1)}


def summarize(runs: list[dict]) -> dict[str, dict]:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    table = {}
    for name, rs in by.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            table[name] = {"error": rs[0]["error"][-300:]}
            continue
        finals = [statistics.mean(r["losses"][-3:]) for r in ok]
        table[name] = {"seeds": len(ok), "loss": statistics.mean(finals), "loss_sd": statistics.pstdev(finals),
                       "exact_match": statistics.mean(r["exact_match"] for r in ok),
                       "exact_match_each": [r["exact_match"] for r in ok],
                       "cpu_step_s": statistics.median(r["cpu_step_s"] for r in ok),
                       "wall_step_s": statistics.median(r["wall_step_s"] for r in ok),
                       "setup_s": statistics.median(r["setup_s"] for r in ok)}
    base = table.get("lora r=16", {})
    for row in table.values():
        if "cpu_step_s" in row and "cpu_step_s" in base:
            row["cpu_relative"] = row["cpu_step_s"] / base["cpu_step_s"]
            row["wall_relative"] = row["wall_step_s"] / base["wall_step_s"]
    return table


def markdown(table: dict[str, dict]) -> str:
    lines = ["| variant | final loss (mean ± sd over seeds) | held-out exact match | CPU s a step | relative to LoRA "
             "(CPU; wall) | setup s |", "|---|---|---|---|---|---|"]
    for name, r in table.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | | |")
            continue
        each = ", ".join(f"{100 * e:.0f}" for e in r["exact_match_each"])
        lines.append(f"| {name} | {r['loss']:.3f} ± {r['loss_sd']:.3f} | {100 * r['exact_match']:.1f}% ({each}) | "
                     f"{r['cpu_step_s']:.2f} | {r.get('cpu_relative', float('nan')):.2f}x; "
                     f"{r.get('wall_relative', float('nan')):.2f}x | {r['setup_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", help=argparse.SUPPRESS)  # one run, in its own process (launch)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"any of: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval", type=int, default=40, help="held-out items")
    parser.add_argument("--task", default="sort_digits")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--timeout-s", type=float, default=3000)
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    parser.add_argument("--table", help="print the table of a runs.jsonl file written by an earlier run")
    ns = parser.parse_args()
    if ns.job:
        return _child(json.loads(ns.job))
    if ns.table:
        return print(markdown(summarize([json.loads(line) for line in open(ns.table) if line.strip()])))
    names = ns.variants.split(",")
    jobs = [{"variant": n, "seed": s, "steps": ns.steps, "batch": ns.batch, "eval": ns.eval, "task": ns.task,
             "threads": 1} for s in range(ns.seeds) for n in names]
    deadline, load, started = time.time() + ns.timeout_s, os.getloadavg(), time.time()
    os.makedirs(ns.out, exist_ok=True)
    partial = Path(ns.out) / f"adapter_variants_{datetime.date.today()}.runs.jsonl"  # each run as it ends
    with ThreadPoolExecutor(ns.parallel) as pool:
        runs = list(pool.map(lambda j: _report(launch(j, deadline - time.time(), script=__file__), partial), jobs))
    table = summarize(runs)
    print(markdown(table))
    record = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "cpu": _cpu(), "load_before": load, "load_after": os.getloadavg(),
              "wall_s": round(time.time() - started), "table": table, "runs": runs}
    path = os.path.join(ns.out, f"adapter_variants_{datetime.date.today()}.json")
    Path(path).write_text(json.dumps(record, indent=2))
    print(f"load average {load[0]:.1f} before, {record['load_after'][0]:.1f} after; {record['wall_s']} s; {path}")


def _report(r: dict, partial: Path) -> dict:
    with open(partial, "a") as f:  # a bench stopped early still leaves its finished runs (--table FILE)
        f.write(json.dumps(r) + "\n")
    print(f"{r['variant']:<13} seed {r['seed']}: " + (f"FAILED {r['error'][-400:]}" if "error" in r else
          f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}, exact match {r['exact_match']}, CPU "
          f"{r['cpu_step_s']:.2f} s a step, setup {r['setup_s']} s"), flush=True)
    return r


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _child(job: dict) -> None:
    from qlora_dist import compat

    compat.set_library_env()
    compat.quiet_known_warnings()
    print("RESULT " + json.dumps(run_job(job)), flush=True)


if __name__ == "__main__":
    main()
