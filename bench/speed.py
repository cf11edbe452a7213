"""Tokens/s of qlora-dist against the reference QLoRA stack, same model, same token batches, one device.

(a) reference: transformers + peft + bitsandbytes as the original QLoRA recipe runs it — NF4 double-quant
    base with bf16 compute, `prepare_model_for_kbit_training` with gradient checkpointing, LoRA r=64
    alpha 16 on every linear layer, LoRA weights bf16 and norms fp32 (qlora.py's casts), bf16 autocast,
    bitsandbytes PagedAdamW32bit, and a plain loop: forward with labels -> backward -> clip 0.3 -> step;
(b) qlora-dist: its own pieces on one rank — config preset, build_ds_config, the model as build_model
    makes it (load, add_lora, prepare_for_training: fused loss, checkpointing as the planner decides),
    initialize, and the trainer's step: engine(**batch).loss -> engine.backward -> engine.step.

Each side runs in its own process (a clean memory peak) at its best micro batch under the cap (the
reference's from ../shared/RECIPE.md, ours from the planner, memory.choose_micro_batch) and at the
reference's batch; the token batches are random ids from a seed, identical for both sides, full rows.
The base weights are the same on both sides: a real folder (SmolLM2) or qlora_dist.model.loader.RandomSource
built layer by layer (so 65B fits). Tokens/s = batch x seq / median step time after warm-up.

  python bench/speed.py --cpu                                   # SmolLM2-135M on this CPU, a few minutes
  python bench/speed.py --shape 7b,65b --timeout-s 280          # one H100 (carry the .whl wheels)
  python bench/speed.py --shape 7b,65b --dry-run                # the GPU plan + the GPU code path on a
                                                                # tiny random shape, on CPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# The reference stack on one H100 (../shared/RECIPE.md): (shape, batch) -> (tokens/s, peak GB).
REFERENCE_H100 = {("7b", 32): (5604, 19.3), ("7b", 16): (5452, 11.7), ("7b", 4): (3443, 5.9),
                  ("65b", 8): (834, 47.1), ("65b", 4): (762, 40.5), ("65b", 1): (313, 36.6)}
# shape -> cap, the reference's best batch under it, sequence length, the recipe's LR and LoRA dropout.
SHAPES = {
    "7b": {"cap": "24GB", "ref_batch": 32, "seq": 512, "preset": "7b-all"},
    "65b": {"cap": "48GB", "ref_batch": 8, "seq": 512, "preset": "65b-all"},
    "smollm2": {"cap": "24GB", "ref_batch": 4, "seq": 128, "preset": None},  # --cpu: same batch both sides
    "smoke": {"cap": "24GB", "ref_batch": 2, "seq": 64, "preset": None},  # --dry-run: tiny random shape
}
SEED = 1234


# --------------------------------------------------------------------------------------- shapes, plan
def llama_config(shape: str):
    from transformers import AutoConfig, LlamaConfig

    from qlora_dist.recipe import LLAMA_SHAPES

    if shape == "smollm2":
        from qlora_dist.model.builtin import resolve_model_path

        return AutoConfig.from_pretrained(resolve_model_path("smollm2"))
    if shape == "smoke":
        return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512)
    s = LLAMA_SHAPES[shape]
    return LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                       num_attention_heads=s.heads, num_key_value_heads=s.heads, vocab_size=s.vocab,
                       max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def our_config(shape: str, batch: int, checkpointing: bool, global_batch: int | None = None,
               extra: list[str] | None = None):
    """Our config for this run: the paper's preset (LR, LoRA dropout, optimizer, clipping), one rank."""
    from qlora_dist.config import load_config

    spec = SHAPES[shape]
    overrides = [f"model.path={'smollm2' if shape == 'smollm2' else 'random'}",
                 f"train.global_batch_size={global_batch or batch}", f"train.micro_batch_size={batch}",
                 f"model.gradient_checkpointing={str(checkpointing).lower()}", "train.max_steps=100",
                 f"data.source_max_len={spec['seq'] // 2}", f"data.target_max_len={spec['seq'] - spec['seq'] // 2}"]
    if not spec["preset"]:  # the 7B recipe's training settings on a small model
        overrides += ["lora.r=64", "lora.alpha=16", "lora.dropout=0.1", "optim.lr=2e-4", "optim.max_grad_norm=0.3",
                      "optim.name=paged_adamw_32bit", "optim.scheduler=constant", "optim.warmup_steps=0"]
    return load_config(preset=spec["preset"], overrides=overrides + list(extra or []))


def plan_shape(shape: str, on_gpu: bool) -> dict:
    """Both sides' runs for one shape: the reference at its best batch (checkpointing, as the recipe);
    ours at the planner's best (micro batch, checkpointing) under the cap and at the reference's batch."""
    from qlora_dist import memory

    spec, cap = SHAPES[shape], memory.parse_size(SHAPES[shape]["cap"])
    config = llama_config(shape)
    mshape = memory.Shape.from_hf(config)
    ref_batch = spec["ref_batch"]
    same = ref_batch if shape in ("smollm2", "smoke") else 64  # --cpu: one batch for both sides
    chosen = memory.choose_micro_batch(our_config(shape, 1, True, global_batch=same), 1, cap, mshape, on_gpu=on_gpu)

    def planned(batch: int, ckpt: bool) -> float:
        return memory.make_plan(memory.setup_from_config(our_config(shape, batch, ckpt), 1, mshape, batch, ckpt,
                                                         on_gpu=on_gpu)).total / 1e9

    fits_without = planned(ref_batch, False) * 1e9 <= cap
    ours = [{"batch": chosen.micro_batch if chosen else 1, "checkpointing": chosen.checkpointing if chosen else True,
             "role": "best"}]
    if ours[0]["batch"] != ref_batch:
        ours.append({"batch": ref_batch, "checkpointing": not fits_without, "role": "same batch"})
    else:
        ours[0]["role"] = "best = same batch"
    if shape == "smoke":  # as 65B on the GPU: a second run in the same process, checkpointing switched
        ours.append({"batch": 1, "checkpointing": not ours[0]["checkpointing"], "role": "dry run: switched"})
    for run in ours:
        run["planned_gb"] = round(planned(run["batch"], run["checkpointing"]), 2)
        run["planner_fits"] = run["planned_gb"] * 1e9 <= cap
    return {"shape": shape, "cap": spec["cap"], "cap_bytes": cap, "seq": spec["seq"], "vocab": config.vocab_size,
            "ref": [{"batch": ref_batch, "checkpointing": True, "role": "best = same batch"}], "ours": ours}


def token_batch(vocab: int, batch: int, seq: int, step: int, device):
    """The same ids for both sides: full rows, labels = ids, nothing masked."""
    import torch

    gen = torch.Generator().manual_seed(SEED + 1000 * step + batch)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# ------------------------------------------------------------------------------------- the two sides
def _base(shape: str, device):
    """The NF4 double-quant base with bf16 compute, identical for both sides."""
    from qlora_dist import compat
    from qlora_dist.model.loader import RandomSource, load_layerwise

    if shape == "smollm2":  # the recipe's own loading: from_pretrained with a BitsAndBytesConfig
        import torch
        from transformers import AutoModelForCausalLM

        from qlora_dist.precision import quantization_config
        from qlora_dist.model.builtin import resolve_model_path

        kwargs = {"device_map": {"": device.index}} if device.type == "cuda" else {}
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2"), dtype=torch.bfloat16,
                                                     quantization_config=quantization_config(4), **kwargs)
        compat.disable_cpu_weight_repacking(model)
        return model
    return load_layerwise(llama_config(shape), RandomSource(), device=device)


def build_reference(shape: str, device, lr: float, dropout: float, seed: int):
    """The original recipe (artidoro/qlora get_accelerate_model + HF Trainer's bf16 autocast)."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from qlora_dist.model.base import lora_target_names

    model = prepare_model_for_kbit_training(_base(shape, device), use_gradient_checkpointing=True)
    torch.manual_seed(seed)  # the same LoRA init as ours (add_lora seeds the same way)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=dropout, bias="none",
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
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    def step(batch) -> float:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


def build_ours(shape: str, device, batch: int, checkpointing: bool, extra: list[str]):
    """qlora-dist's path: what Trainer.setup does (build_ds_config, build_model, initialize), one rank."""
    from qlora_dist.launch import dist
    from qlora_dist.train.engine import build_ds_config, initialize, zero_stage
    from qlora_dist.model.loader import RandomSource, load_layerwise
    from qlora_dist.model.base import add_lora, build_model, prepare_for_training

    cfg = our_config(shape, batch, checkpointing, extra=extra)
    dist.init()
    ds = build_ds_config(cfg, 1)
    if shape == "smollm2":
        model, _ = build_model(cfg, device, ds)
    else:  # build_model's steps with random weights in place of a folder
        stage3 = zero_stage(ds) == 3
        model = load_layerwise(llama_config(shape), RandomSource(), device=device, ds_config=ds if stage3 else None)
        model = add_lora(model, cfg, cfg.train.seed)
        prepare_for_training(model, cfg)
    model.enable_input_require_grads()  # so checkpointing can be switched per run below
    engine = initialize(cfg, model, ds)

    def step(batch) -> float:  # Trainer._train_step, one micro batch
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        return loss.item()

    return engine.module, step


def set_checkpointing(model, on: bool) -> None:
    """Non-reentrant activation checkpointing on or off (transformers 5.24 renamed the methods from
    gradient_checkpointing_*; the GPU machines carry 5.17)."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


# ------------------------------------------------------------------------------------------ one side
def _memory_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # process peak RSS (KiB on Linux)


def run_side(job: dict) -> None:
    """One side, one shape, its runs in turn; prints one RESULT line per run."""
    import torch

    from qlora_dist import compat

    compat.set_library_env()
    compat.quiet_known_warnings()
    compat.paged_optimizer_note()
    device = torch.device("cuda:0" if torch.cuda.is_available() and not job["cpu"] else "cpu")
    if job.get("threads"):
        # With other jobs on the cores, OpenMP threads spin at barriers waiting for a descheduled peer: a
        # step ran 7x slower with 2 threads on 2 shared cores. One thread a side keeps the ratio honest.
        torch.set_num_threads(job["threads"])
    if device.type == "cuda":
        # The cap is judged on peak *allocated* memory, as ../shared/RECIPE.md measured the reference (65B
        # 8 x 512: 47.1 GB under 48). The allocator's hard limit counts reserved memory, fragmentation
        # included, so it sits 5 % above the cap; `within_cap` in the results is the verdict.
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, 1.05 * job["cap_bytes"] / total), device)
    first = job["runs"][0]
    t0 = time.perf_counter()
    if job["side"] == "ref":
        cfg = our_config(job["shape"], first["batch"], True)  # the recipe's LR and dropout for this size
        model, step = build_reference(job["shape"], device, cfg.optim.lr, cfg.lora.dropout, cfg.train.seed)
    else:
        model, step = build_ours(job["shape"], device, first["batch"], first["checkpointing"], job["ours_config"])
    load_s = time.perf_counter() - t0
    for run in job["runs"]:
        if job["side"] == "ours":
            set_checkpointing(model, run["checkpointing"])
        _memory_reset(device)
        torch.manual_seed(SEED)  # the same dropout masks on both sides
        times, losses, error = [], [], None
        try:
            for i in range(job["warmup"] + job["steps"]):
                batch = token_batch(job["vocab"], run["batch"], job["seq"], i, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                losses.append(step(batch))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= job["warmup"]:
                    times.append(time.perf_counter() - start)
        except torch.OutOfMemoryError as exc:
            error = f"out of memory under the {job['cap']} cap: {str(exc).splitlines()[0][:200]}"
            torch.cuda.empty_cache()
        median = statistics.median(times) if times else None
        result = {**run, "side": job["side"], "shape": job["shape"], "seq": job["seq"], "load_s": round(load_s, 1),
                  "step_s": median, "tokens_per_s": run["batch"] * job["seq"] / median if median else None,
                  "peak_gb": round(_peak_gb(device), 3), "within_cap": _peak_gb(device) * 1e9 <= job["cap_bytes"],
                  "peak_kind": "cuda max allocated" if device.type == "cuda"
                  else "process peak RSS (includes loading)", "losses": losses, "step_times": times, "error": error}
        print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------- the driver
def _launch(job: dict, timeout: float) -> list[dict]:
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **os.environ, "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29700 + os.getpid() % 200)}
    cmd = [sys.executable, os.path.abspath(__file__), "--job", json.dumps(job)]
    runs = [{**r, "side": job["side"], "shape": job["shape"], "seq": job["seq"]} for r in job["runs"]]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        done = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
        return done + [{**r, "error": f"timed out after {timeout:.0f} s"} for r in runs[len(done):]]
    done = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if len(done) < len(runs):
        tail = proc.stderr.strip().splitlines()[-15:]
        done += [{**r, "error": f"exit {proc.returncode}: " + "\n".join(tail)} for r in runs[len(done):]]
    return done


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
    return {"shape": plan["shape"], "cap": plan["cap"], "ratio_best": ratio(ours_best, ref),
            "ratio_same_batch": ratio(ours_same, ref), "loss_abs_diff_per_step": diffs,
            "loss_abs_diff_max": max(diffs) if diffs else None,
            "reference_h100_recipe_md": REFERENCE_H100.get((plan["shape"], plan["ref"][0]["batch"]))}


def _row(r: dict) -> str:
    side = "reference" if r["side"] == "ref" else "qlora-dist"
    what = f"{r['shape']:<8} {side:<10} {r['batch']:>3}x{r.get('seq', '')}" \
           f" ckpt {'on ' if r['checkpointing'] else 'off'} {r['role']:<18}"
    if r.get("error"):
        return f"{what} FAILED: {r['error'][-300:]}"
    planned = f" (planned {r['planned_gb']:.1f})" if "planned_gb" in r else ""
    over = "" if r.get("within_cap", True) else " OVER THE CAP"
    speed = f"{r['tokens_per_s']:>9,.1f} tok/s  step {r['step_s']:.3f} s"
    return f"{what} {speed}  peak {r['peak_gb']:.2f} GB{planned}{over}"


def _device_name(cpu: bool) -> str:
    import torch

    if cpu or not torch.cuda.is_available():
        return f"cpu-{os.cpu_count()}cores"
    return torch.cuda.get_device_name(0).replace(" ", "-").lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="7b,65b", help="comma-separated: 7b, 65b")
    parser.add_argument("--cpu", action="store_true", help="SmolLM2-135M on this CPU (both sides at 4 x 128)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; run both sides on a tiny random "
                                                                "shape on CPU through the GPU code path")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="measured steps (median)")
    parser.add_argument("--timeout-s", type=float, default=None,
                        help="whole run, all cases together (default 280; --cpu 1800)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads a side (default: --cpu 1)")
    parser.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for our side, e.g. model.compile_kernels=true model.fused_lora=false")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    parser.add_argument("--job", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.job:
        run_side(json.loads(ns.job))
        return
    import torch

    deadline = time.time() + (ns.timeout_s or (1800 if ns.cpu else 280))
    load_start = os.getloadavg()
    shapes = ["smollm2"] if ns.cpu else ns.shape.split(",")
    on_gpu = not ns.cpu and (torch.cuda.is_available() or ns.dry_run)
    if not ns.cpu and not ns.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --cpu (SmolLM2 here) or --dry-run (the GPU plan and code path on CPU)")
    plans = [plan_shape(s, on_gpu) for s in shapes]
    for p in plans:
        print(f"plan {p['shape']} under {p['cap']}: reference {p['ref']}; qlora-dist {p['ours']}", flush=True)
    if ns.dry_run:  # the same code path, on a shape a CPU runs in seconds
        plans = [plan_shape("smoke", True)]
    warmup = ns.warmup if ns.warmup is not None else (1 if ns.cpu or ns.dry_run else 2)
    steps = ns.steps if ns.steps is not None else (1 if ns.dry_run else 3)
    cpu = ns.cpu or ns.dry_run
    results, summaries = [], []
    for p in plans:
        for side in ("ref", "ours"):
            job = {"shape": p["shape"], "side": side, "runs": p[side], "seq": p["seq"], "vocab": p["vocab"],
                   "cap": p["cap"], "cap_bytes": p["cap_bytes"], "warmup": warmup, "steps": steps, "cpu": cpu,
                   "ours_config": ns.ours, "threads": ns.threads or (1 if ns.cpu else None)}
            left = deadline - time.time()
            got = _launch(job, left) if left > 5 else [{**r, "side": side, "shape": p["shape"], "seq": p["seq"],
                                                         "error": "skipped: --timeout-s spent"} for r in p[side]]
            for r in got:
                print(_row(r), flush=True)
            results += got
        summaries.append(summarize(p, [r for r in results if r["shape"] == p["shape"]]))
    report = {"date": datetime.date.today().isoformat(), "device": _device_name(cpu), "torch": torch.__version__,
              "ours_config": ns.ours, "threads": ns.threads or (1 if ns.cpu else None),
              "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
              "warmup": warmup, "steps": steps, "plans": plans, "results": results, "summary": summaries}
    variant = "".join(f"_{o.split('.')[-1].replace('=', '-')}" for o in ns.ours)  # e.g. _compile_kernels-true
    name = f"speed_{'dryrun' if ns.dry_run else _device_name(cpu)}{variant}_{report['date']}.json"
    for folder in filter(None, [ns.out, os.environ.get("OUT")]):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            json.dump(report, f, indent=2)
    print("\n" + "\n".join(_row(r) for r in results))
    for s in summaries:
        fmt = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
        loss = "-" if s["loss_abs_diff_max"] is None else f"{s['loss_abs_diff_max']:.4f}"
        print(f"{s['shape']:<8} under {s['cap']}: qlora-dist / reference = {fmt(s['ratio_best'])} at each side's best, "
              f"{fmt(s['ratio_same_batch'])} at the same batch; max |loss difference| over the same steps {loss}")
    print(f"written: {name}")


if __name__ == "__main__":
    main()
