"""Checkpoints: adapter in PEFT format, full training state, a progress record; atomic; resumable.

Layout of OUTPUT/checkpoint-<step>/ (the adapter part is the original QLoRA code's layout):
    adapter_model/adapter_config.json, adapter_model.safetensors   PEFT: PeftModel.from_pretrained loads it
    adapter_model/qlora_dist.json   the run's own settings (quantization storage, prompt format, base model)
    engine/                    DeepSpeed state: LoRA weights, fp32 masters, optimizer moments, LR schedule
    rng/rank-<r>.pt            each rank's RNG states (dropout continues exactly)
    config.yaml                the run's configuration as given (`auto` stays `auto`; a starting
                               adapter's lora.* values filled in where the user set none)
    run_plan.json              what `auto` resolved to on this run (compute dtype, micro batch, ...)
    progress.json              step, data position, seed, world size: written last

Everything is written into OUTPUT/.tmp-checkpoint-<step>/ and renamed into place only when complete,
so a crash mid-save leaves the previous checkpoint as the newest one and the partial folder is removed
at the next start. Policy when the config and a checkpoint disagree: keys that do not change the next
optimizer step (config.RESUMABLE_CHANGES) may differ; any other difference is an error naming each key.
Values resolved at run time live in run_plan.json, not in config.yaml, so a run that said
`train.micro_batch_size=auto` resumes on another world size or memory cap and resolves them anew.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from qlora_dist import atomic, compat
from qlora_dist.config import RESUMABLE_CHANGES, Config, flat
from qlora_dist.errors import ConfigError
from qlora_dist.launch import dist
from qlora_dist.paths import RunPaths

# Test hook, named as such: kill this process half-way through writing the checkpoint of this step
# (after the engine state, before the rename), as a node failure would. Used by tests/test_train_e2e.py.
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


def read_progress(ckpt: Path) -> Progress:
    return Progress(**json.loads((ckpt / "progress.json").read_text()))


def read_saved_config(ckpt: Path) -> dict:
    return yaml.safe_load((ckpt / "config.yaml").read_text())


def resume_point(paths: RunPaths, cfg: Config) -> Path | None:
    """The checkpoint a run of `cfg` continues from, or None for a fresh start. Reads only small files
    (the preflight calls it too); a checkpoint of another configuration is an error naming each key."""
    ckpts = paths.checkpoints()
    if not ckpts:
        return None
    newest = ckpts[-1]
    if not cfg.checkpoint.resume:
        raise ConfigError([f"train.output_dir: {paths.root} already holds {newest.name}; use another output "
                           "folder, or checkpoint.resume=true to continue it"])
    diffs = config_differences(read_saved_config(newest), cfg)
    if diffs:
        raise ConfigError([f"train.output_dir: {paths.root} holds {newest.name} of a different configuration "
                           f"({'; '.join(diffs)}); use another train.output_dir, or the checkpoint's values"])
    return newest


def config_differences(saved: dict, cfg: Config) -> list[str]:
    old, new = flat(saved), flat(cfg.to_dict())
    keys = sorted(set(old) | set(new))
    return [f"{k}: checkpoint has {old.get(k)!r}, this run has {new.get(k)!r}" for k in keys
            if not k.startswith(RESUMABLE_CHANGES) and old.get(k) != new.get(k)]


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


# ---------------------------------------------------------------------------------------------------
# Loading

def _load(engine, ckpt: Path, rank: int, world_size: int) -> Progress:
    """Restore the engine (LoRA weights, fp32 masters, optimizer, LR schedule) and this rank's RNG.
    On the checkpoint's own world size DeepSpeed loads it (bitwise); on another, reshard does."""
    progress = read_progress(ckpt)
    if progress.world_size == world_size and progress.zero_stage == engine.zero_optimization_stage():
        load_path, _ = engine.load_checkpoint(str(ckpt), tag="engine", load_module_strict=compat.LOAD_MODULE_STRICT,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"{ckpt}/engine: DeepSpeed could not load this checkpoint")
    else:
        from qlora_dist.train import reshard

        dist.log(f"{ckpt.name} was saved by {progress.world_size} rank(s) under ZeRO-{progress.zero_stage}; this "
                 f"run has {world_size} under ZeRO-{engine.zero_optimization_stage()}: resharding the LoRA "
                 "weights and optimizer states")
        reshard.restore(engine, ckpt)
    _restore_rng(ckpt, rank)
    return progress


# ---------------------------------------------------------------------------------------------------
class Checkpointer:
    """Everything a run does with checkpoints, in the order it does it: recover (clear interrupted
    saves, find the checkpoint to continue), restore (engine, RNG), save (atomic, collective), finalize
    (the final adapter and the `completed` record). `cfg` is the user's config (saved as given); `plan`
    is what its `auto` values resolved to on this run (a JSON-able dict, saved beside it)."""

    def __init__(self, paths: RunPaths, cfg: Config, plan: dict, rank: int, world_size: int):
        self.paths, self.cfg, self.plan = paths, cfg, plan
        self.rank, self.world_size = rank, world_size
        self.resume_from: Path | None = None

    def recover(self) -> Path | None:
        """Rank 0 removes saves that never completed; every rank finds the same checkpoint to resume."""
        if self.rank == 0:
            for tmp in self.paths.partial_checkpoints():
                dist.log(f"removing {tmp.name}: a save that was interrupted before it completed")
                shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        self.resume_from = resume_point(self.paths, self.cfg)
        return self.resume_from

    @property
    def start_step(self) -> int:
        return read_progress(self.resume_from).step if self.resume_from else 0

    def completed(self) -> dict | None:
        """The `completed` record when this folder already finished this run (same config, same steps)."""
        path, steps = self.paths.completed, self.cfg.train.max_steps
        if self.resume_from is None or not path.is_file():
            return None
        done = json.loads(path.read_text())
        return done if done.get("step") == steps == read_progress(self.resume_from).step else None

    def restore(self, engine) -> int:
        """The step to continue from: the checkpoint's, with engine and RNG restored; 0 for a fresh start."""
        if self.resume_from is None:
            torch.manual_seed(self.cfg.train.seed + self.rank)  # each rank its own dropout stream
            return 0
        progress = _load(engine, self.resume_from, self.rank, self.world_size)
        dist.log(f"resuming from {self.resume_from} (step {progress.step}, {progress.samples_seen} samples seen)")
        return progress.step

    def save(self, engine, progress: Progress, zero_stage: int) -> Path:
        """Save a complete checkpoint (collective: every rank calls it). Returns its folder."""
        final, tmp = self.paths.checkpoint(progress.step), self.paths.partial_checkpoint(progress.step)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        dist.barrier()
        engine.save_checkpoint(str(tmp), tag="engine", save_latest=False, exclude_frozen_parameters=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank-{self.rank}.pt")
        export_adapter(engine.module, tmp / "adapter_model", zero_stage)
        if os.environ.get(CRASH_IN_SAVE_ENV) == str(progress.step):
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()
        if self.rank == 0:
            self._write_records(tmp, progress)
            if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        dist.barrier()
        return final

    def _write_records(self, tmp: Path, progress: Progress) -> None:
        from qlora_dist.model import adapter_settings

        q = self.cfg.quantization
        adapter_settings.write(tmp / "adapter_model", base_model=str(self.cfg.model.path), bits=q.bits,
                               quant_type=q.quant_type, double_quant=q.double_quant,
                               compute_dtype=self.plan["compute_dtype"])
        (tmp / "config.yaml").write_text(self.cfg.to_yaml())
        atomic.write_text(tmp / "run_plan.json", json.dumps(self.plan, indent=2))
        progress.saved_at = time.time()
        atomic.write_text(tmp / "progress.json", json.dumps(asdict(progress), indent=2))  # last: marks it complete

    def _prune(self) -> None:
        keep = self.cfg.checkpoint.keep_last
        for old in self.paths.checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def finalize(self, ckpt: Path, info: dict) -> None:
        """Rank 0 at the end: OUTPUT/adapter_model (a copy of the last adapter) and the `completed` record."""
        with atomic.folder(self.paths.adapter, replace=True) as tmp:
            shutil.copytree(ckpt / "adapter_model", tmp, dirs_exist_ok=True)
        record = {**info, "checkpoint": ckpt.name, "finished_at": time.time()}
        atomic.write_text(self.paths.completed, json.dumps(record, indent=2))
