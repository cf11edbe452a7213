"""`qlora-dist train` end to end, as a user runs it: N steps with a save halfway, SIGKILL right after that
save, the same command again (it resumes and finishes), then the adapter loaded with PEFT onto the base
and compared with the saved tensors. Writes one JSON (the first run of the product on a GPU, issue 14).

  python bench/gpu_e2e.py --out $OUT                      # the 7B shape (random:7b), one GPU
  python bench/gpu_e2e.py --dry-run --out /tmp/x          # tiny-llama on this CPU, the same steps
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train_command(model: str, out: Path, steps: int, cap: str | None) -> list[str]:
    return [sys.executable, "-m", "qlora_dist", "train", f"model.path={model}", f"train.output_dir={out}",
            f"train.max_steps={steps}", f"train.save_steps={steps // 2}", "train.global_batch_size=8",
            "train.logging_steps=1", "eval.at_start=false", "eval.at_end=false", "data.num_train=200",
            "data.num_eval=8", *([f"train.max_memory_per_gpu={cap}", "train.micro_batch_size=auto"] if cap else [])]


def kill_after_save(cmd: list[str], saved: Path, timeout: float) -> dict:
    """Start the run; SIGKILL it (its whole process group) once `saved` exists (checkpoints appear by an
    atomic rename, so the folder's existence means a complete checkpoint)."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    while proc.poll() is None and not saved.is_dir() and time.time() - start < timeout:
        time.sleep(0.2)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    return {"killed": killed, "saw_checkpoint": saved.is_dir(), "seconds": round(time.time() - start, 1),
            "exit": proc.returncode, "tail": out.strip().splitlines()[-5:]}


def adapter_check(model: str, adapter: Path) -> dict:
    """PEFT loads the adapter onto a base of the same shape; its LoRA weights equal the saved file's."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_dist.model.builtin import random_llama_config, random_size, resolve_model_path

    config = random_llama_config(size) if (size := random_size(model)) else \
        AutoConfig.from_pretrained(resolve_model_path(model))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(peft_model)  # the same key names as the file's
    diff = max((loaded[k].float().cpu() - v.float()).abs().max().item() for k, v in saved.items())
    return {"saved_tensors": len(saved), "lora_tensors_loaded": len(loaded), "max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny-llama on CPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout-s", type=float, default=150, help="each of the two runs")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    ns = parser.parse_args()
    model, cap = ("tiny-llama", None) if ns.dry_run else ("random:7b", "24GB")
    run_dir = Path(tempfile.mkdtemp(prefix="qlora-e2e-")) / "run"
    cmd = train_command(model, run_dir, ns.steps, cap)
    report = {"model": model, "steps": ns.steps, "command": " ".join(cmd[1:]), "ok": False}
    try:
        resume_and_check(report, cmd, run_dir, model, ns)
    finally:  # whatever happened, the JSON says how far it got
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        (Path(ns.out) / "e2e_train_kill_resume.json").write_text(json.dumps(report, indent=2, default=str))
        print(json.dumps({k: report.get(k) for k in ("ok", "first", "second")}, indent=1, default=str))
        shutil.rmtree(run_dir.parent, ignore_errors=True)


def resume_and_check(report: dict, cmd: list[str], run_dir: Path, model: str, ns) -> None:
    report["first"] = kill_after_save(cmd, run_dir / f"checkpoint-{ns.steps // 2}", ns.timeout_s)
    start = time.time()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=ns.timeout_s)
    report["second"] = {"exit": second.returncode, "seconds": round(time.time() - start, 1),
                        "tail": second.stderr.strip().splitlines()[-5:]}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plans = [r for r in metrics if r.get("event") == "plan"]
    steps = [r for r in metrics if "loss" in r and "event" not in r]
    report["second"]["resumed_from"] = plans[-1].get("resume_from") if plans else None
    report["second"]["completed"] = json.loads((run_dir / "completed").read_text()) if second.returncode == 0 else None
    report["last_step"] = steps[-1] if steps else None
    # The resumed run's paged AdamW states must stay paged (compat.repage_optimizer_states): the paged GB
    # of its steps no lower than the first run's, the allocator peak no higher by their size.
    report["paged_by_step"] = [(r["step"], r.get("paged_optimizer_gb"), r.get("gpu_peak_gb")) for r in steps]
    before = [g for step, g, _ in report["paged_by_step"] if step <= ns.steps // 2 and g is not None]
    report["paged_kept_after_resume"] = bool(steps) and (steps[-1].get("paged_optimizer_gb") or 0) >= max(before or [0])
    report["adapter"] = adapter_check(model, run_dir / "adapter_model") if second.returncode == 0 else None
    report["ok"] = bool(report["first"]["killed"] and second.returncode == 0 and report["adapter"]
                        and report["adapter"]["max_abs_diff"] == 0.0 and report["second"]["resumed_from"])


if __name__ == "__main__":
    main()
