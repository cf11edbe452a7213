"""Tokens/s of qlora-dist against the reference QLoRA stack, same model, same token batches, one device.

(a) reference: transformers + peft + bitsandbytes as the original QLoRA recipe runs it — NF4 double-quant
    base with bf16 compute, `prepare_model_for_kbit_training` with gradient checkpointing, LoRA r=64
    alpha 16 on every linear layer, LoRA weights bf16 and norms fp32 (qlora.py's casts), bf16 autocast,
    bitsandbytes PagedAdamW32bit, and a plain loop: forward with labels -> backward -> clip 0.3 -> step;
(b) qlora-dist: its own `Trainer` (bench/trainer_run.py), configured as a user would — the paper's preset,
    `model.path=random:7b` / `random:65b` (or `smollm2`), the planner's micro batch and checkpointing under
    the cap (`train.max_memory_per_gpu`) — with tokens/s and peak memory read from its metrics.jsonl.

Each run is its own process (a clean memory peak). Both sides train on the same rows in the same order:
random words cut by tokenization to full rows of `seq` tokens, every token labelled; the reference reads
them with qlora-dist's tokenization and batch schedule (data is not what is compared). The base weights
are the same on both sides: the SmolLM2 folder, or the `random:<size>` weights (layer-wise, seed 0; the
reference gets them from the same loader, as no 7B/65B files exist here). Tokens/s = tokens of a step /
the median step time after warm-up; peak memory includes loading on both sides. MFU: both sides by
qlora_dist/train/throughput.py (None without a peak, e.g. on CPU). On CPU each side's CPU seconds a step are
given too: with other jobs on the cores they move far less than wall time. `--time-save` times one save
(the adapter export, then a whole checkpoint) after our best run.

  python bench/speed.py --cpu                                   # SmolLM2-135M on this CPU, a few minutes
  python bench/speed.py --shape 7b,65b --timeout-s 560          # one GPU (carry the .whl wheels)
  python bench/speed.py --shape 7b,65b --dry-run                # the GPU plan + the GPU code path on a
                                                                # tiny random shape, on CPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_run import REPO, launch, synthetic_rows  # noqa: E402  (also puts the repository on sys.path)

# The reference stack on one H100 (../shared/RECIPE.md): (shape, batch) -> (tokens/s, peak GB).
REFERENCE_H100 = {("7b", 32): (5604, 19.3), ("7b", 16): (5452, 11.7), ("7b", 4): (3443, 5.9),
                  ("65b", 8): (834, 47.1), ("65b", 4): (762, 40.5), ("65b", 1): (313, 36.6)}
# shape -> model.path, cap, the reference's best batch under it, sequence length, preset (the recipe's LR,
# LoRA dropout, optimizer); without a preset, recipe_overrides() gives the 7B recipe's settings.
SHAPES = {
    "7b": {"model": "random:7b", "cap": "24GB", "ref_batch": 32, "seq": 512, "preset": "7b-all"},
    "65b": {"model": "random:65b", "cap": "48GB", "ref_batch": 8, "seq": 512, "preset": "65b-all"},
    "smollm2": {"model": "smollm2", "cap": "24GB", "ref_batch": 4, "seq": 128, "preset": None},  # --cpu
    "smoke": {"model": "random:smoke", "cap": "24GB", "ref_batch": 2, "seq": 64, "preset": None},  # --dry-run
}


# --------------------------------------------------------------------------------------------- configs
def recipe_overrides(shape: str) -> list[str]:
    """The 7B recipe's training settings for a model without a paper preset; bf16 compute as the recipe."""
    if SHAPES[shape]["preset"]:
        return []
    return ["lora.r=64", "lora.alpha=16", "lora.dropout=0.1", "optim.lr=2e-4", "optim.max_grad_norm=0.3",
            "optim.name=paged_adamw_32bit", "optim.scheduler=constant", "optim.warmup_steps=0",
            "model.compute_dtype=bfloat16"]


def our_config(shape: str, batch: int, checkpointing: bool, global_batch: int | None = None, ours=()):
    """The config our runs use, for the planner and for the reference's LR and dropout."""
    from qlora_dist.config import load_config

    spec = SHAPES[shape]
    overrides = [f"model.path={spec['model']}", f"train.global_batch_size={global_batch or batch}",
                 f"train.micro_batch_size={batch}", f"model.gradient_checkpointing={str(checkpointing).lower()}",
                 f"data.source_max_len={spec['seq'] // 2}", f"data.target_max_len={spec['seq'] - spec['seq'] // 2}"]
    return load_config(None, spec["preset"], overrides + recipe_overrides(shape) + list(ours))


def plan_shape(shape: str, on_gpu: bool, overrides=()) -> dict:
    """Both sides' runs for one shape: the reference at its best batch (checkpointing, as the recipe);
    ours at the planner's best (micro batch, checkpointing) under the cap and at the reference's batch."""
    from qlora_dist import memory
    from qlora_dist.config import parse_size

    spec, cap = SHAPES[shape], parse_size(SHAPES[shape]["cap"])
    ref_batch = spec["ref_batch"]
    same = ref_batch if shape in ("smollm2", "smoke") else 64  # --cpu, --dry-run: one batch for both sides
    mshape = memory.shape_for(our_config(shape, 1, True))
    chosen = memory.choose_micro_batch(our_config(shape, 1, True, global_batch=same, ours=overrides), 1, cap, mshape,
                                       on_gpu=on_gpu)  # --ours counts: e.g. dist.ds_config=zero2_offload

    def planned(batch: int, ckpt: bool) -> float:
        cfg = our_config(shape, batch, ckpt, ours=overrides)
        return memory.make_plan(memory.setup_from_config(cfg, 1, mshape, batch, ckpt, on_gpu=on_gpu)).total / 1e9

    ours = [{"batch": chosen.micro_batch if chosen else 1, "checkpointing": chosen.checkpointing if chosen else True,
             "role": "best"}]
    if ours[0]["batch"] != ref_batch:
        ours.append({"batch": ref_batch, "checkpointing": planned(ref_batch, False) * 1e9 > cap, "role": "same batch"})
    else:
        ours[0]["role"] = "best = same batch"
    for run in ours:
        run["planned_gb"] = round(planned(run["batch"], run["checkpointing"]), 2)
        run["planner_fits"] = run["planned_gb"] * 1e9 <= cap
    return {"shape": shape, "cap": spec["cap"], "cap_bytes": cap, "seq": spec["seq"],
            "ref": [{"batch": ref_batch, "checkpointing": True, "role": "best = same batch"}], "ours": ours}


# ---------------------------------------------------------------------------------------- the reference
def _base(shape: str, device, cfg):
    """The NF4 double-quant base with bf16 compute, the same weights as our side's."""
    from qlora_dist import compat
    from qlora_dist.model.builtin import random_size

    if size := random_size(SHAPES[shape]["model"]):  # no files: the same random weights as model.path=random:
        from qlora_dist.model.base import load_base_random

        return load_base_random(size, cfg, device)
    import torch  # the recipe's own loading: from_pretrained with a BitsAndBytesConfig
    from transformers import AutoModelForCausalLM

    from qlora_dist.model.builtin import resolve_model_path
    from qlora_dist.precision import quantization_config

    kwargs = {"device_map": {"": device.index}} if device.type == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(SHAPES[shape]["model"]), dtype=torch.bfloat16,
                                                 quantization_config=quantization_config(4), **kwargs)
    compat.disable_cpu_weight_repacking(model)
    return model


def build_reference(shape: str, device, cfg):
    """The original recipe (artidoro/qlora get_accelerate_model + HF Trainer's bf16 autocast)."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from qlora_dist.model.base import lora_target_names

    model = prepare_model_for_kbit_training(_base(shape, device, cfg), use_gradient_checkpointing=True)
    torch.manual_seed(cfg.train.seed)  # the same LoRA init as ours (add_lora seeds the same way)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=cfg.lora.dropout, bias="none",
                                             target_modules=lora_target_names(model), task_type="CAUSAL_LM"))
    for name, module in model.named_modules():  # qlora.py: LoRA bf16, norms fp32, embeddings/lm_head bf16
        if "norm" in name:
            module.to(torch.float32)
        elif ("lm_head" in name or "embed_tokens" in name) and getattr(module, "weight", None) is not None \
                and module.weight.dtype == torch.float32:
            module.to(torch.bfloat16)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=cfg.optim.lr, betas=(0.9, 0.999), weight_decay=0.0)

    def step(batch) -> float:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    from qlora_dist.model.base import count_parameters

    step.parameters = count_parameters(model)[1]  # for MFU, counted as our Trainer counts them
    return step


def reference_batches(job: dict, cfg, device):
    """The batches our Trainer trains on, step by step: the same rows, tokenizer, cuts and order."""
    from qlora_dist.data.batches import BatchSchedule, collate, tokenize_batch
    from qlora_dist.data.formats import Example
    from qlora_dist.model.base import load_tokenizer

    tokenizer = load_tokenizer(SHAPES[job["shape"]]["model"])
    examples = [Example(r["input"], r["output"]) for r in synthetic_rows(job["rows"], job["seq"])]
    rows = tokenize_batch(examples, tokenizer, cfg.data.source_max_len, cfg.data.target_max_len, True)
    schedule = BatchSchedule(len(rows), job["batch"], job["batch"], 0, 1, cfg.train.seed)
    for step in range(job["warmup"] + job["steps"]):
        batch = collate([rows[i] for i in schedule.global_indices(step)], tokenizer.pad_token_id)
        yield {k: v.to(device) for k, v in batch.items()}


def run_reference(job: dict) -> dict:
    """One reference run in this process: load, then the plain loop; tokens/s over the steps after warm-up."""
    import resource

    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])  # as our side (bench/trainer_run.py says why)
    device = torch.device("cuda:0" if torch.cuda.is_available() and not job["cpu"] else "cpu")
    if device.type == "cuda":
        # The cap is judged on peak *allocated* memory, as ../shared/RECIPE.md measured the reference (65B
        # 8 x 512: 47.1 GB under 48). The allocator's hard limit counts reserved memory, fragmentation
        # included, so it sits 5 % above the cap here; our Trainer's limit is the cap itself (stricter).
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, 1.05 * job["cap_bytes"] / total), device)
    cfg = our_config(job["shape"], job["batch"], True)  # the recipe's LR, dropout and seed for this size
    t0 = time.perf_counter()
    step = build_reference(job["shape"], device, cfg)
    load_s = time.perf_counter() - t0
    torch.manual_seed(cfg.train.seed)  # the same dropout masks as our Trainer's rank 0
    times, cpu_times, losses = [], [], []
    for i, batch in enumerate(reference_batches(job, cfg, device)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step(batch))  # .item() waits for the device
        cpu_times.append(time.process_time() - cpu_start)
        if i >= job["warmup"]:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    from qlora_dist.train.throughput import Throughput

    speed = Throughput(step.parameters, 1, "" if device.type == "cpu" else None).of(job["batch"] * job["seq"], median)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    return {"step_s": median, "tokens_per_s": job["batch"] * job["seq"] / median, "step_times": times,
            "losses": losses, "peak_gb": round(peak, 3), "load_s": round(load_s, 1), "mfu": speed["mfu"],
            "mfu_peak": speed["mfu_peak"], "parameters": step.parameters, "cpu_step_times": cpu_times,
            "cpu_step_s": statistics.median(cpu_times[job["warmup"]:]),
            "peak_kind": "gpu_peak_gb" if device.type == "cuda" else "rss_peak_gb"}


# ---------------------------------------------------------------------------------------- the driver
def jobs_for(plan: dict, side: str, ns, warmup: int, steps: int, cpu: bool) -> list[dict]:
    """One process per run. Ours: a Trainer job (bench/trainer_run.py) under the cap when on a GPU (or
    rehearsing it, --dry-run), so the trainer's own plan check and allocator cap apply."""
    spec = SHAPES[plan["shape"]]
    rows = max(r["batch"] for r in plan["ref"] + plan["ours"]) * (warmup + steps)
    jobs = []
    for run in plan[side]:
        job = {**run, "side": side, "shape": plan["shape"], "seq": plan["seq"], "rows": rows, "warmup": warmup,
               "steps": steps, "threads": ns.threads or (1 if ns.cpu else None), "cap_bytes": plan["cap_bytes"]}
        if side == "ref":
            job["cpu"] = cpu
        else:
            job.update(model=spec["model"], preset=spec["preset"], extra=recipe_overrides(plan["shape"]) + ns.ours,
                       cap=None if ns.cpu else spec["cap"], time_save=ns.time_save and run["role"].startswith("best"))
        jobs.append(job)
    return jobs


def run_one(job: dict, deadline: float) -> dict:
    """One run in its own process, within what is left of --timeout-s."""
    left = deadline - time.time()
    if left < 5:
        return {**job, "error": "skipped: --timeout-s spent"}
    script = os.path.abspath(__file__) if job["side"] == "ref" else None
    result = launch(job, left, script)
    if job["side"] == "ours" and "error" not in result and not result["full_rows"]:
        result["error"] = f"rows were not all {job['seq']} tokens: {result['tokens_per_step']} tokens a step"
    if "error" not in result:
        result["within_cap"] = result["peak_gb"] * 1e9 <= job["cap_bytes"]
    return result


def summarize(plan: dict, results: list[dict]) -> dict:
    """Ratios ours/reference at each side's best and at the same batch; the loss difference per step."""
    ref = next((r for r in results if r["side"] == "ref"), None)
    ours_best = next((r for r in results if r["side"] == "ours" and r["role"].startswith("best")), None)
    ours_same = next((r for r in results if r["side"] == "ours" and "same" in r["role"]), None)

    def ratio(a, b):
        if a and b and a.get("tokens_per_s") and b.get("tokens_per_s"):
            return a["tokens_per_s"] / b["tokens_per_s"]
        return None

    diffs = None
    if ref and ours_same and ref.get("losses") and ours_same.get("losses"):
        diffs = [abs(a - b) for a, b in zip(ref["losses"], ours_same["losses"])]
    cpu_ratio = ref["cpu_step_s"] / ours_best["cpu_step_s"] if ref and ours_best and ref.get("cpu_step_s") \
        and ours_best.get("cpu_step_s") else None  # same tokens a step on CPU (--cpu, --dry-run)
    return {"shape": plan["shape"], "cap": plan["cap"], "ratio_best": ratio(ours_best, ref),
            "ratio_best_cpu_time": cpu_ratio if ref and ours_best and ref.get("cpu") and ref["batch"] == ours_best["batch"]
            else None,
            "ratio_same_batch": ratio(ours_same, ref), "loss_abs_diff_per_step": diffs,
            "loss_abs_diff_max": max(diffs) if diffs else None,
            "mfu_ours_best": (ours_best or {}).get("mfu"), "mfu_reference": (ref or {}).get("mfu"),
            "save": {k: ours_best[k] for k in ("adapter_export_s", "checkpoint_s", "adapter_bytes", "checkpoint_bytes")
                     if k in ours_best} if ours_best else {},
            "reference_h100_recipe_md": REFERENCE_H100.get((plan["shape"], plan["ref"][0]["batch"]))}


def _row(r: dict) -> str:
    side = "reference" if r["side"] == "ref" else "qlora-dist"
    what = f"{r['shape']:<8} {side:<10} {r['batch']:>3}x{r['seq']} ckpt {'on ' if r['checkpointing'] else 'off'} " \
           f"{r['role']:<18}"
    if r.get("error"):
        return f"{what} FAILED: {r['error'][-300:]}"
    planned = f" (planned {r['planned_gb']:.1f})" if "planned_gb" in r else ""
    over = "" if r["within_cap"] else " OVER THE CAP"
    mfu = "MFU n/a" if r.get("mfu") is None else f"MFU {100 * r['mfu']:.1f}%"
    return f"{what} {r['tokens_per_s']:>9,.1f} tok/s  {mfu}  step {r['step_s']:.3f} s  peak {r['peak_gb']:.2f} GB" \
           f"{planned}{over}"


def _device_name(cpu: bool) -> str:
    import torch

    if cpu or not torch.cuda.is_available():
        return f"cpu-{os.cpu_count()}cores"
    return torch.cuda.get_device_name(0).replace(" ", "-").lower()


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="7b,65b", help="comma-separated: 7b, 65b")
    parser.add_argument("--cpu", action="store_true", help="SmolLM2-135M on this CPU (both sides at 4 x 128)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; run both sides on a tiny random "
                                                                "shape on CPU through the GPU code path")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="measured steps (median)")
    parser.add_argument("--timeout-s", type=float, default=None,
                        help="whole run, all cases together (default 560; --cpu 1800)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads a side (default: --cpu 1)")
    parser.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for our side, e.g. model.compile_kernels=true model.fused_lora=false")
    parser.add_argument("--time-save", action="store_true", help="time one save (adapter export, whole "
                                                                     "checkpoint) after our best run")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    parser.add_argument("--job", help=argparse.SUPPRESS)
    return parser.parse_args()


def write_report(ns, report: dict) -> str:
    variant = "".join(f"_{o.split('.')[-1].replace('=', '-')}" for o in ns.ours)  # e.g. _compile_kernels-true
    shapes = "" if ns.cpu else "_" + ns.shape.replace(",", "-")  # one file per GPU call: 7b and 65b apart
    name = f"speed_{'dryrun' if ns.dry_run else report['device']}{shapes}{variant}_{report['date']}.json"
    for folder in filter(None, [ns.out, os.environ.get("OUT")]):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            json.dump(report, f, indent=2)
    return name


def main() -> None:
    ns = parse_args()
    if ns.job:  # a reference run, in this process
        from qlora_dist import compat

        compat.set_library_env()
        compat.quiet_known_warnings()
        print("RESULT " + json.dumps(run_reference(json.loads(ns.job))), flush=True)
        return
    import torch

    deadline = time.time() + (ns.timeout_s or (1800 if ns.cpu else 560))
    load_start = os.getloadavg()
    if not ns.cpu and not ns.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --cpu (SmolLM2 here) or --dry-run (the GPU plan and code path on CPU)")
    plans = [plan_shape(s, not ns.cpu, ns.ours) for s in (["smollm2"] if ns.cpu else ns.shape.split(","))]
    for p in plans:
        print(f"plan {p['shape']} under {p['cap']}: reference {p['ref']}; qlora-dist {p['ours']}", flush=True)
    if ns.dry_run:  # the same code path, on a shape a CPU runs in seconds
        plans = [plan_shape("smoke", True, ns.ours)]
    warmup = ns.warmup if ns.warmup is not None else (1 if ns.cpu or ns.dry_run else 2)
    steps = ns.steps if ns.steps is not None else (1 if ns.dry_run else 3)
    cpu = ns.cpu or ns.dry_run
    results, summaries = [], []
    for p in plans:
        for side in ("ref", "ours"):
            for job in jobs_for(p, side, ns, warmup, steps, cpu):
                results.append(run_one(job, deadline))
                print(_row(results[-1]), flush=True)
        summaries.append(summarize(p, [r for r in results if r["shape"] == p["shape"]]))
    report = {"date": datetime.date.today().isoformat(), "device": _device_name(cpu), "cpu_model": _cpu_model(),
              "torch": torch.__version__, "ours_config": ns.ours, "threads": ns.threads or (1 if ns.cpu else None),
              "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
              "warmup": warmup, "steps": steps, "plans": plans, "results": results, "summary": summaries}
    name = write_report(ns, report)
    print("\n" + "\n".join(_row(r) for r in results))
    for s in summaries:
        fmt = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
        loss = "-" if s["loss_abs_diff_max"] is None else f"{s['loss_abs_diff_max']:.4f}"
        print(f"{s['shape']:<8} under {s['cap']}: qlora-dist / reference = {fmt(s['ratio_best'])} at each side's best, "
              f"{fmt(s['ratio_same_batch'])} at the same batch; max |loss difference| over the same steps {loss}")
        if s["ratio_best_cpu_time"]:
            print(f"{s['shape']:<8} in CPU seconds a step (one thread a side; less moved by other jobs on the cores): "
                  f"{fmt(s['ratio_best_cpu_time'])}")
        if s["save"]:
            print(f"{s['shape']:<8} one save: adapter export {s['save']['adapter_export_s']} s "
                  f"({s['save']['adapter_bytes'] / 1e9:.2f} GB), whole checkpoint {s['save']['checkpoint_s']} s "
                  f"({s['save']['checkpoint_bytes'] / 1e9:.2f} GB)")
    print(f"written: {name}")


if __name__ == "__main__":
    main()
