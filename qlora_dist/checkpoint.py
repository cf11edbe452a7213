"""Checkpoints: adapter in PEFT format, full training state, a progress record; atomic; resumable.

Layout of OUTPUT/checkpoint-<step>/ (the adapter part is the original QLoRA code's layout):
    adapter_model/adapter_config.json, adapter_model.safetensors   PEFT: PeftModel.from_pretrained loads it
    engine/                    DeepSpeed state: LoRA weights, fp32 masters, optimizer moments, LR schedule
    rng/rank-<r>.pt            each rank's RNG states (dropout continues exactly)
    config.yaml                the resolved config of the run
    progress.json              step, data position, seed, world size: written last

Everything is written into OUTPUT/.tmp-checkpoint-<step>/ and renamed into place only when complete,
so a crash mid-save leaves the previous checkpoint as the newest one and the partial folder is removed
at the next start. Policy when the config and a checkpoint disagree: keys that do not change the next
optimizer step (config.RESUMABLE_CHANGES) may differ; any other difference is an error naming each key.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from . import atomic, compat, dist
from .config import RESUMABLE_CHANGES, Config, ConfigError, flat

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
COMPLETED = "completed"
# Test hook, named as such: kill this process half-way through writing the checkpoint of this step
# (after the engine state, before the rename), as a node failure would. Used by tests/test_resume.py.
CRASH_IN_SAVE_ENV = "QLORA_DIST_TEST_CRASH_IN_SAVE_AT_STEP"


@dataclass
class Progress:
    step: int  # optimizer steps done
    samples_seen: int  # data position: the next step starts at this index of the example stream
    epoch: float
    seed: int
    world_size: int
    global_batch_size: int
    zero_stage: int
    loss: float | None = None
    saved_at: float = 0.0


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and (p / "progress.json").is_file()]
    return [p for _, p in sorted(found)]


def read_progress(ckpt: Path) -> Progress:
    return Progress(**json.loads((ckpt / "progress.json").read_text()))


def read_saved_config(ckpt: Path) -> dict:
    return yaml.safe_load((ckpt / "config.yaml").read_text())


def config_differences(saved: dict, cfg: Config) -> list[str]:
    old, new = flat(saved), flat(cfg.to_dict())
    keys = sorted(set(old) | set(new))
    return [f"{k}: checkpoint has {old.get(k)!r}, this run has {new.get(k)!r}" for k in keys
            if not k.startswith(RESUMABLE_CHANGES) and old.get(k) != new.get(k)]


def remove_partial_saves(output_dir: Path) -> None:
    """Rank 0, at start: folders of saves that never completed are not checkpoints."""
    for tmp in output_dir.glob(TMP_PREFIX + "*") if output_dir.is_dir() else []:
        dist.log(f"removing {tmp.name}: a save that was interrupted before it completed")
        shutil.rmtree(tmp, ignore_errors=True)


def find_resume(output_dir: Path, cfg: Config) -> Path | None:
    """The checkpoint this run continues from, or None for a fresh start; errors on a mismatch."""
    ckpts = list_checkpoints(output_dir)
    if not ckpts:
        return None
    newest = ckpts[-1]
    if not cfg.checkpoint.resume:
        raise ConfigError([f"train.output_dir: {output_dir} already holds {newest.name}; use another output "
                           "folder, or checkpoint.resume=true to continue it"])
    diffs = config_differences(read_saved_config(newest), cfg)
    if diffs:
        raise ConfigError([f"train.output_dir: {output_dir} holds {newest.name} of a different configuration:"]
                          + [f"  {d}" for d in diffs]
                          + ["use another train.output_dir, or the checkpoint's values"])
    return newest


# ---------------------------------------------------------------------------------------------------
# Saving

def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def adapter_state_dict(model: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The LoRA weights, whole, on rank 0 (None elsewhere). Under ZeRO-3 they are gathered, and only
    they: the frozen base is never all-gathered, which is what lets a 65B run save at all."""
    params = lora_parameters(model)
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            state = {n: p.detach().cpu().clone() for n, p in params.items()} if dist.is_main() else None
        return state
    return {n: p.detach().cpu().clone() for n, p in params.items()} if dist.is_main() else None


def export_adapter(model, out_dir: Path, zero_stage: int) -> None:
    """Write the PEFT adapter (adapter_config.json + adapter_model.safetensors) into out_dir.
    Collective under ZeRO-3: every rank must call it."""
    state = adapter_state_dict(model, zero_stage)
    if state is None:
        return
    if not state or any(t.numel() == 0 for t in state.values()):
        raise RuntimeError("refusing to write an empty or partial adapter (LoRA weights were not gathered)")
    model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(ckpt: Path, rank: int) -> None:
    path = ckpt / "rng" / f"rank-{rank}.pt"
    if not path.is_file():  # a larger world than the checkpoint's: seed the new rank's dropout stream
        torch.manual_seed(read_progress(ckpt).seed + rank)
        return
    state = torch.load(path, weights_only=False)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_json_atomic(path: Path, data: dict) -> None:
    atomic.write_text(path, json.dumps(data, indent=2))


def save(engine, cfg: Config, progress: Progress, output_dir: Path, rank: int, zero_stage: int) -> Path:
    """Save a complete checkpoint (collective: every rank calls it). Returns its folder."""
    final = output_dir / f"checkpoint-{progress.step}"
    tmp = output_dir / f"{TMP_PREFIX}{progress.step}"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag="engine", save_latest=False, exclude_frozen_parameters=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank-{rank}.pt")
    export_adapter(engine.module, tmp / "adapter_model", zero_stage)
    if os.environ.get(CRASH_IN_SAVE_ENV) == str(progress.step):
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    if dist.is_main():
        (tmp / "config.yaml").write_text(cfg.to_yaml())
        progress.saved_at = time.time()
        _write_json_atomic(tmp / "progress.json", asdict(progress))
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(output_dir, cfg.checkpoint.keep_last)
    dist.barrier()
    return final


def _prune(output_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def publish_final(output_dir: Path, ckpt: Path, info: dict) -> None:
    """Rank 0 at the end: OUTPUT/adapter_model (a copy of the last adapter) and the `completed` mark."""
    with atomic.folder(output_dir / "adapter_model", replace=True) as tmp:
        shutil.copytree(ckpt / "adapter_model", tmp, dirs_exist_ok=True)
    _write_json_atomic(output_dir / COMPLETED, {**info, "checkpoint": ckpt.name, "finished_at": time.time()})


def read_completed(output_dir: Path, max_steps: int, resume_from: Path | None) -> dict | None:
    """The `completed` record when this folder already finished this run (same config, same steps)."""
    path = output_dir / COMPLETED
    if resume_from is None or not path.is_file():
        return None
    done = json.loads(path.read_text())
    return done if done.get("step") == max_steps == read_progress(resume_from).step else None


# ---------------------------------------------------------------------------------------------------
# Loading

def load(engine, ckpt: Path, rank: int, world_size: int) -> Progress:
    """Restore the engine (LoRA weights, fp32 masters, optimizer, LR schedule) and this rank's RNG.
    On the checkpoint's own world size DeepSpeed loads it (bitwise); on another, reshard does."""
    progress = read_progress(ckpt)
    if progress.world_size == world_size and progress.zero_stage == engine.zero_optimization_stage():
        load_path, _ = engine.load_checkpoint(str(ckpt), tag="engine", load_module_strict=compat.LOAD_MODULE_STRICT,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"{ckpt}/engine: DeepSpeed could not load this checkpoint")
    else:
        from . import reshard

        dist.log(f"{ckpt.name} was saved by {progress.world_size} rank(s) under ZeRO-{progress.zero_stage}; this "
                 f"run has {world_size} under ZeRO-{engine.zero_optimization_stage()}: resharding the LoRA "
                 "weights and optimizer states")
        reshard.restore(engine, ckpt)
    _restore_rng(ckpt, rank)
    return progress
