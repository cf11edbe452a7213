"""Checkpoints: adapter in PEFT format, full training state, a progress record; atomic; resumable.

Layout of OUTPUT/checkpoint-<step>/ (the adapter part is the original QLoRA code's layout):
    adapter_model/adapter_config.json, adapter_model.safetensors   PEFT: PeftModel.from_pretrained loads it
    adapter_model/qlora_dist.json   the run's own settings (quantization storage, prompt format, base model)
                               (no adapter_model/ under train.method=full: engine/ holds every weight)
    engine/                    DeepSpeed state: LoRA weights, fp32 masters, optimizer moments, LR schedule
    rng/rank-<r>.safetensors   each rank's RNG states (dropout continues exactly); no pickle
    environment.json           library versions, git commit, host, CPU/GPU names of the run that saved it
    config.yaml                the run's configuration as given (`auto` stays `auto`; a starting
                               adapter's lora.* values filled in where the user set none)
    run_plan.json              what `auto` resolved to on this run (compute dtype, micro batch, ...)
    progress.json              step, data position, seed, world size, data content sha256, validation
                               loss, and the best checkpoint so far (checkpoint.keep_best)
    manifest.json              size and sha256 of every other file: written last (see train/manifest.py)

Everything is written into OUTPUT/.tmp-checkpoint-<step>/ and renamed into place only when complete,
so a crash mid-save leaves the previous checkpoint as the newest one and the partial folder is removed
at the next start. Policy when the config and a checkpoint disagree: keys that do not change the next
optimizer step (config.RESUMABLE_CHANGES) may differ; any other difference is an error naming each key.
Values resolved at run time live in run_plan.json, not in config.yaml, so a run that said
`train.micro_batch_size=auto` resumes on another world size or memory cap and resolves them anew.

Trust: a checkpoint is resumed only if it matches its manifest and its LoRA weights, fp32 masters and
optimizer states are finite; otherwise it is renamed checkpoint-<step>.damaged (never deleted) and the
next older one is tried. Nothing is unpickled with code: safetensors, JSON/YAML, and torch.load with
weights_only=True (DeepSpeed's engine files included, see compat.safe_torch_load). A checkpoint whose
LoRA weights or masters are not finite is never written. Resuming on other data (content sha256) is an
error unless data.allow_changed=true; other library versions or hardware are logged.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import yaml

from qlora_dist import atomic, compat
from qlora_dist.config import ADDED_AT_DEFAULT, RESUMABLE_CHANGES, Config, flat
from qlora_dist.errors import ConfigError, RunFault
from qlora_dist import dist
from qlora_dist.model import adapter_settings
from qlora_dist.paths import CHECKPOINT_RE, RunPaths
from qlora_dist.train import environment, manifest, paged_masters

# Test hook, named as such: kill this process half-way through writing the checkpoint of this step
# (after the engine state, before the rename), as a node failure would. Used by tests/test_train_e2e.py.
CRASH_IN_SAVE_ENV = "QLORA_DIST_TEST_CRASH_IN_SAVE_AT_STEP"
DAMAGED_SUFFIX = ".damaged"


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
    data_sha256: str | None = None  # content of the training rows (corpus.content_sha256); None: older run
    nonfinite_steps: int = 0  # steps skipped so far for a NaN/inf (train/guard.py): the limit spans requeues
    eval_loss: float | None = None  # validation loss at this step (evaluate/validation.py), if validated
    best_step: int | None = None  # the checkpoint of the lowest eval_loss so far, this one included
    best_eval_loss: float | None = None  # (checkpoint.keep_best keeps it; recorded here to survive resume)
    sequence_parallel: int = 1  # dist.sequence_parallel of the run that saved it (1: older runs)


def read_progress(ckpt: Path) -> Progress:
    """The progress record; a damaged one is a ConfigError naming the file."""
    path = ckpt / "progress.json"
    try:
        record = json.loads(path.read_text())
        known = {f.name for f in fields(Progress)}
        progress = Progress(**{k: v for k, v in record.items() if k in known})
        if not isinstance(progress.step, int) or progress.step < 0:
            raise TypeError
        return progress
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError, OSError):
        raise ConfigError([f"{path}: not a valid progress record (damaged)"]) from None


def read_saved_config(ckpt: Path) -> dict:
    return yaml.safe_load((ckpt / "config.yaml").read_text())


def checkpoint_problem(ckpt: Path, deep: bool) -> str | None:
    """Why `ckpt` must not be resumed ("file: why", relative to it), or None. Sizes against the manifest
    always; with `deep`, also sha256 and a scan for non-finite values (reads every file once)."""
    why = manifest.damage(ckpt, deep)
    if why is None:
        try:
            read_progress(ckpt)
        except ConfigError:
            why = "progress.json: not a valid progress record (damaged)"
    if why is None:
        try:
            if not isinstance(read_saved_config(ckpt), dict):
                why = "config.yaml: not a configuration (damaged)"
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
            why = f"config.yaml: unreadable ({str(exc).splitlines()[0]})"
    if why is None and deep:
        why = manifest.nonfinite(ckpt)
    return why


def verdict(ckpt: Path) -> str:
    """`qlora-dist verify`'s word on one checkpoint: ok / damaged: file, why / non-finite: tensor."""
    why = checkpoint_problem(ckpt, deep=True) if (ckpt / "progress.json").is_file() else "progress.json: missing"
    if why is None:
        return "ok" if manifest.read(ckpt) is not None else "ok (no manifest: saved before manifests; not verified)"
    return ("non-finite: " if why.endswith(manifest.NONFINITE) else "damaged: ") + why


def verify_folder(root: Path) -> list[tuple[str, bool, str]]:
    """(name, ok, verdict) for every checkpoint of an output folder, then its final adapter."""
    if not root.is_dir():
        raise ConfigError([f"OUTPUT_DIR: {root} is not a folder"])
    ckpts = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir())
    rows = [(p.name, (v := verdict(p)).startswith("ok"), v) for _, p in ckpts]
    paths = RunPaths(root)
    if paths.model.exists():  # train.method=full: the trained model instead of an adapter
        return rows + [_model_verdict(paths)]
    return rows + [_adapter_verdict(paths)] if rows or paths.adapter.exists() else rows


def _model_verdict(paths: RunPaths) -> tuple[str, bool, str]:
    from qlora_dist.train.model_export import model_problems

    problems = model_problems(paths.model)
    return paths.model.name, not problems, f"damaged: {problems[0]}" if problems else "ok (headers checked)"


def _adapter_verdict(paths: RunPaths) -> tuple[str, bool, str]:
    name = paths.adapter.name
    if not paths.adapter.exists():
        return name, True, "none yet (the run has not finished)"
    try:
        source = paths.root / json.loads(paths.completed.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        source = None
    if source is not None and (source / manifest.MANIFEST).is_file():
        why = manifest.matches(paths.adapter, source, "adapter_model/")
        return name, why is None, f"damaged: {why}" if why else f"ok (matches {source.name})"
    from qlora_dist.model.folder import safetensors_problems

    weights = paths.adapter / "adapter_model.safetensors"
    problems = safetensors_problems(weights, name) if weights.is_file() else [f"{weights.name}: missing"]
    return name, not problems, f"damaged: {problems[0]}" if problems else "ok (its checkpoint is gone: header checked)"


def resume_point(paths: RunPaths, cfg: Config, deep: bool = False) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint a run of `cfg` continues from (None for a fresh start), and the newer checkpoints
    skipped as damaged, with why. The preflight calls it with deep=False (sizes only); recover with
    deep=True. A checkpoint of another configuration, or beyond train.max_steps, is an error."""
    ckpts = paths.checkpoints()
    if not ckpts:
        return None, []
    if not cfg.checkpoint.resume:
        raise ConfigError([f"train.output_dir: {paths.root} already holds {ckpts[-1].name}; use another output "
                           "folder, or checkpoint.resume=true to continue it"])
    damaged = []
    for ckpt in reversed(ckpts):
        why = checkpoint_problem(ckpt, deep)
        if why is None:
            _check_resumable(paths, ckpt, cfg)
            return ckpt, damaged
        damaged.append((ckpt, why))
    raise ConfigError([f"train.output_dir: no intact checkpoint to resume in {paths.root}: "
                       + "; ".join(f"{ckpt.name}/{why}" for ckpt, why in damaged)
                       + "; move the folder aside (or checkpoint-* out of it) to start afresh"])


def _check_resumable(paths: RunPaths, ckpt: Path, cfg: Config) -> None:
    # The data's path may change (a job copying it to node-local scratch) when the checkpoint records
    # the data's content: check_data compares that instead.
    by_content = ("data.dataset",) if read_progress(ckpt).data_sha256 else ()
    diffs = config_differences(read_saved_config(ckpt), cfg, by_content)
    if diffs:
        raise ConfigError([f"train.output_dir: {paths.root} holds {ckpt.name} of a different configuration "
                           f"({'; '.join(diffs)}); use another train.output_dir, or the checkpoint's values"])
    # The same model.path (checked above), but is it still the model the checkpoint's adapter was trained on?
    # (train.method=full saves no adapter: its engine state holds every weight.)
    adapter = ckpt / "adapter_model"
    if adapter.is_dir() and (problems := adapter_settings.base_problems(
            adapter, cfg.model.path, "train.output_dir", "model.allow_base_mismatch=true",
            allowed=cfg.model.allow_base_mismatch)):
        raise ConfigError(problems)
    done, where = max((read_progress(ckpt).step, ckpt.name), (_completed_step(paths), paths.completed.name))
    if done > cfg.train.max_steps:
        raise ConfigError([f"train.max_steps: {cfg.train.max_steps} is below the {done} steps {paths.root} already "
                           f"holds ({where}); set train.max_steps={done} or more, or use another train.output_dir"])


def _completed_step(paths: RunPaths) -> int:
    try:
        return int(json.loads(paths.completed.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def config_differences(saved: dict, cfg: Config, also_resumable: tuple[str, ...] = (),
                       ignore: tuple[str, ...] | None = None) -> list[str]:
    """Keys whose value differs, one line each; those starting with `ignore` (default: what a resume may
    change) left out."""
    ignore = RESUMABLE_CHANGES + also_resumable if ignore is None else ignore
    old, new = {**ADDED_AT_DEFAULT, **flat(saved)}, flat(cfg.to_dict())
    # saved before train.method existed: quantization.bits=16 was LoRA on a 16-bit base (config.resolve_method)
    old.setdefault("train.method", "lora" if old.get("quantization.bits") == 16 else "qlora")
    keys = sorted(set(old) | set(new))
    return [(f"{k}: checkpoint has {old[k]!r}" if k in old else
             f"{k}: not in the checkpoint (saved by a qlora-dist before the key existed)")
            + f", this run has {new.get(k)!r}" for k in keys
            if not k.startswith(ignore) and old.get(k) != new.get(k)]


def set_aside(ckpt: Path, why: str) -> Path:
    """Rename a damaged checkpoint out of the way (never delete what a user may want to inspect)."""
    target = ckpt.with_name(ckpt.name + DAMAGED_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{ckpt.name}{DAMAGED_SUFFIX}-{n}")
    os.replace(ckpt, target)
    dist.log(f"{ckpt.name} is damaged ({why}): not resuming from it; moved it to {target.name}")
    return target


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


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


def local_nonfinite(engine) -> str | None:
    """The first of this rank's LoRA weights (its partition under ZeRO-3) or fp32 master slices that holds
    a NaN or Inf; None when all are finite."""
    for name, p in lora_parameters(engine.module).items():
        if not bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()):
            return f"LoRA weight {name}"
    for attr in paged_masters.MASTER_LISTS:  # where deepspeed 0.19.8 keeps this rank's fp32 masters
        for i, flat_group in enumerate(getattr(engine.optimizer, attr, None) or []):
            if not bool(torch.isfinite(flat_group).all()):
                return f"fp32 master weights (parameter group {i})"
    return None


# RNG states as safetensors (torch/cuda states are uint8 tensors) with python's state as JSON in the
# metadata: read back without unpickling anything.
def _rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / "rng" / f"rank-{rank}.safetensors"


def _save_rng(path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(path), metadata={"python": json.dumps(random.getstate())})


def _read_rng(ckpt: Path, rank: int) -> tuple[dict, tuple] | None:
    from safetensors import safe_open

    path = _rng_file(ckpt, rank)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            version, state, gauss = json.loads(f.metadata()["python"])
            return {k: f.get_tensor(k) for k in f.keys()}, (version, tuple(state), gauss)
    legacy = ckpt / "rng" / f"rank-{rank}.pt"  # written before 2026-12: a torch pickle, read without code
    if legacy.is_file():
        state = compat.safe_torch_load(legacy)
        return {k: state[k] for k in ("torch", "cuda") if k in state}, state["python"]
    return None


def _restore_rng(ckpt: Path, rank: int) -> None:
    try:
        found = _read_rng(ckpt, rank)
    except Exception as exc:  # a damaged or crafted legacy file (new ones are covered by the manifest)
        raise RunFault(f"{ckpt}/rng: cannot read rank {rank}'s RNG state ({manifest.reason(exc)})") from None
    if found is None:  # a larger world than the checkpoint's: seed the new rank's dropout stream
        torch.manual_seed(read_progress(ckpt).seed + rank)
        return
    tensors, python_state = found
    torch.set_rng_state(tensors["torch"])
    random.setstate(python_state)
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# ---------------------------------------------------------------------------------------------------
# Loading

def _same_layout(progress: Progress, engine, world_size: int) -> bool:
    """Whether DeepSpeed's own load_checkpoint can read the engine files: same world size, ZeRO stage and
    dist.sequence_parallel. The Ulysses mpu makes DeepSpeed 0.19.8 name them by the rank in the group
    (mp_rank_01_...), which another dist.sequence_parallel looks for in vain; reshard reads any names."""
    return (progress.world_size == world_size and progress.zero_stage == engine.zero_optimization_stage()
            and progress.sequence_parallel == getattr(engine, "sequence_parallel_size", 1))


def _load(engine, ckpt: Path, rank: int, world_size: int, full: bool = False) -> Progress:
    """Restore the engine (LoRA weights, fp32 masters, optimizer, LR schedule) and this rank's RNG.
    On the checkpoint's own layout DeepSpeed loads it (bitwise); on another, reshard does."""
    progress = read_progress(ckpt)
    compat.load_engine_files_safely(engine)
    try:
        if _same_layout(progress, engine, world_size):
            load_path, _ = engine.load_checkpoint(str(ckpt), tag="engine", load_module_strict=compat.LOAD_MODULE_STRICT,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
            if load_path is None:
                raise RuntimeError("DeepSpeed found no checkpoint there")
        elif full:
            raise ConfigError([different_layout_for_full(ckpt, progress, world_size, engine.zero_optimization_stage())])
        else:
            from qlora_dist.train import reshard

            now_sp = getattr(engine, "sequence_parallel_size", 1)
            dist.log(f"{ckpt.name} was saved by {progress.world_size} rank(s) under ZeRO-{progress.zero_stage}"
                     f"{f', dist.sequence_parallel={progress.sequence_parallel}' if progress.sequence_parallel > 1 else ''}; "
                     f"this run has {world_size} under ZeRO-{engine.zero_optimization_stage()}"
                     f"{f', dist.sequence_parallel={now_sp}' if now_sp > 1 else ''}: resharding the LoRA "
                     "weights and optimizer states")
            reshard.restore(engine, ckpt)
    except (RunFault, ConfigError):
        raise
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        # verified against its manifest, so a file we cannot read safely (or a layout reshard refuses)
        raise RunFault(f"{ckpt}/engine: cannot load the engine state ({manifest.reason(exc)})") from None
    _restore_rng(ckpt, rank)
    return progress


def different_layout_for_full(ckpt: Path, progress: Progress, world_size: int, stage: int) -> str:
    """The refusal to resume full fine-tuning on another layout. reshard.py re-slices LoRA weights and their
    bitsandbytes moments and was never checked on every weight of a model. DeepSpeed 0.19.8's universal
    checkpoint (ds_to_universal) knows torch Adam's moment names only (exp_avg, exp_avg_sq), not the
    bitsandbytes optimizers' (state1, state2), and no test here shows it bitwise: refused, not guessed."""
    return (f"train.output_dir: {ckpt.name} was saved by {progress.world_size} rank(s) under ZeRO-{progress.zero_stage}; "
            f"this run has {world_size} under ZeRO-{stage}: full fine-tuning (train.method=full) resumes on the "
            f"world size and ZeRO stage it was saved with only; start {progress.world_size} rank(s) with that "
            "stage, or use another train.output_dir")


# ---------------------------------------------------------------------------------------------------
class Checkpointer:
    """Everything a run does with checkpoints, in the order it does it: recover (clear interrupted
    saves, find the newest intact checkpoint to continue), check_data, restore (engine, RNG), save
    (finite, atomic, collective, with a manifest), finalize (the final adapter and the `completed`
    record). `cfg` is the user's config (saved as given); `plan` is what its `auto` values resolved to
    on this run (a JSON-able dict, saved beside it)."""

    def __init__(self, paths: RunPaths, cfg: Config, plan: dict, rank: int, world_size: int):
        self.paths, self.cfg, self.plan = paths, cfg, plan
        self.rank, self.world_size = rank, world_size
        self.resume_from: Path | None = None
        self.data_sha256: str | None = None
        self.full = cfg.train.method == "full"  # every weight trained: no adapter; the model folder at the end
        # train.method=full under checkpoint.keep_best: every checkpoint also holds model/ (the trainer's
        # export, a collective), so the best one kept is a folder from_pretrained loads, not engine state only
        self.export_model: Callable[[Path], None] | None = None

    def recover(self) -> Path | None:
        """Rank 0 removes saves that never completed, verifies the newest checkpoint (sha256, finite
        values) and sets damaged ones aside; every rank gets the same checkpoint to resume, or the same
        error."""
        found = None
        if self.rank == 0:
            for tmp in self.paths.partial_checkpoints():
                dist.log(f"removing {tmp.name}: a save that was interrupted before it completed")
                shutil.rmtree(tmp, ignore_errors=True)
            found = self._choose()
        path, problems = dist.broadcast_object(found)
        if problems:
            raise ConfigError(problems)
        self.resume_from = Path(path) if path else None
        return self.resume_from

    def _choose(self) -> tuple[str | None, list[str] | None]:
        try:
            point, damaged = resume_point(self.paths, self.cfg, deep=True)
        except ConfigError as exc:
            return None, exc.problems
        for ckpt, why in damaged:
            set_aside(ckpt, why)
        return (str(point) if point else None), None

    def newest_good(self) -> Path | None:
        """The newest checkpoint whose manifest verifies and whose LoRA weights, fp32 masters and optimizer
        states are all finite (None if there is none). Reads files only: any rank may call it."""
        return next((c for c in reversed(self.paths.checkpoints()) if checkpoint_problem(c, deep=True) is None), None)

    @property
    def start_step(self) -> int:
        return read_progress(self.resume_from).step if self.resume_from else 0

    def completed(self) -> dict | None:
        """The `completed` record when this folder already finished this run (same config, same steps)
        and its final adapter is intact; a damaged final adapter is written again by finalize."""
        steps = self.cfg.train.max_steps
        if self.resume_from is None or not _completed_step(self.paths) == steps == read_progress(self.resume_from).step:
            return None
        if self.full:
            from qlora_dist.train.model_export import model_problems

            if why := next(iter(model_problems(self.paths.model)), None):
                dist.log(f"{why}: writing the trained model's folder again from {self.resume_from.name}")
                return None
            return json.loads(self.paths.completed.read_text())
        if why := manifest.matches(self.paths.adapter, self.resume_from, "adapter_model/"):
            dist.log(f"{why}: the final adapter is damaged; writing it again from {self.resume_from.name}")
            return None
        return json.loads(self.paths.completed.read_text())

    def check_data(self, data_sha256: str) -> None:
        """Refuse to continue a checkpoint on other training data (by content: the same rows copied
        elsewhere are the same data), unless data.allow_changed; note other library versions or hardware."""
        self.data_sha256 = data_sha256
        if self.resume_from is None:
            return
        saved = read_progress(self.resume_from).data_sha256
        if saved not in (None, data_sha256):
            change = (f"the training data changed since {self.resume_from.name} (content sha256 {saved[:16]} "
                      f"then, {data_sha256[:16]} now)")
            if not self.cfg.data.allow_changed:
                raise ConfigError([f"data.dataset: {change}; resuming would continue mid-epoch on other rows. "
                                   "Use the same data, another train.output_dir, or data.allow_changed=true"])
            dist.log(f"{change}: continuing anyway (data.allow_changed=true)")
        if changes := environment.changes(self.resume_from / environment.FILE):
            dist.log(f"{self.resume_from.name} was saved with other software or hardware: {changes}")

    def restore(self, engine) -> Progress | None:
        """The progress record to continue from, with engine and RNG restored; None for a fresh start."""
        if self.resume_from is None:
            torch.manual_seed(self.cfg.train.seed + self.rank)  # each rank its own dropout stream
            return None
        progress = _load(engine, self.resume_from, self.rank, self.world_size, self.full)
        compat.repage_optimizer_states(engine.optimizer)  # bitsandbytes' load unpages them (compat says why)
        paged_masters.apply(engine, self.cfg, f"after loading {self.resume_from.name}")  # masters DeepSpeed replaced
        dist.log(f"resuming from {self.resume_from} (step {progress.step}, {progress.samples_seen} samples seen)")
        return progress

    def save(self, engine, progress: Progress, zero_stage: int) -> Path:
        """Save a complete checkpoint (collective: every rank calls it). Returns its folder. Non-finite
        weights are never written; a full disk leaves the previous checkpoint and no partial one."""
        self._refuse_nonfinite(engine, progress.step)
        progress.data_sha256 = self.data_sha256
        final, tmp = self.paths.checkpoint(progress.step), self.paths.partial_checkpoint(progress.step)
        try:
            self._write(engine, tmp, progress, zero_stage)
        except Exception as exc:
            if not compat.is_disk_full(exc):
                raise
            raise self._disk_full(tmp, progress.step) from None
        if self.rank == 0:
            if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        dist.barrier()
        return final

    def _refuse_nonfinite(self, engine, step: int) -> None:
        found = local_nonfinite(engine)
        if dist.all_reduce_sum([1.0 if found else 0.0])[0]:  # every rank stops at the same step
            ckpts, where = self.paths.checkpoints(), found or "another rank's weights"
            raise RunFault(f"step {step}: non-finite values (NaN/Inf) in {where}; "
                           f"not saving checkpoint-{step}, {ckpts[-1].name if ckpts else 'no checkpoint'} stays "
                           "the newest")

    def _write(self, engine, tmp: Path, progress: Progress, zero_stage: int) -> None:
        """Every file of the checkpoint into `tmp`, the manifest last (collective)."""
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        dist.barrier()
        engine.save_checkpoint(str(tmp), tag="engine", save_latest=False, exclude_frozen_parameters=True)
        _save_rng(_rng_file(tmp, self.rank))
        if not self.full:
            export_adapter(engine.module, tmp / "adapter_model", zero_stage)
        elif self.cfg.checkpoint.keep_best and self.export_model is not None:
            self.export_model(tmp / "model")
        if os.environ.get(CRASH_IN_SAVE_ENV) == str(progress.step):
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()
        if self.rank == 0:
            self._write_records(tmp, progress)
            manifest.write(tmp)

    def _disk_full(self, tmp: Path, step: int) -> RunFault:
        """The fault to report when the disk filled during a save; the partial folder is removed."""
        written = folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        ckpts = self.paths.checkpoints()
        needed = max(written, folder_bytes(ckpts[-1]) if ckpts else 0)
        free = shutil.disk_usage(self.paths.root).free
        return RunFault(f"no space left on the device of {self.paths.root} while saving checkpoint-{step}: it "
                        f"needs about {needed:,} bytes, {free:,} are free; removed the partial {tmp.name}; "
                        f"{ckpts[-1].name + ' stays the newest checkpoint' if ckpts else 'no checkpoint was kept'}")

    def _write_records(self, tmp: Path, progress: Progress) -> None:
        q = self.cfg.quantization
        if not self.full:
            adapter_settings.write(tmp / "adapter_model", base_model=str(self.cfg.model.path), bits=q.bits,
                                   quant_type=q.quant_type, double_quant=q.double_quant,
                                   compute_dtype=self.plan["compute_dtype"], prompt_template=self.cfg.data.chat_template,
                                   lora_init=self.cfg.lora.init, lora_init_iters=self.cfg.lora.init_iters)
        (tmp / "config.yaml").write_text(self.cfg.to_yaml())
        atomic.write_text(tmp / "run_plan.json", json.dumps(self.plan, indent=2))
        atomic.write_text(tmp / environment.FILE, json.dumps(environment.describe(), indent=2))
        progress.saved_at = time.time()
        self._rank_best(progress)
        atomic.write_text(tmp / "progress.json", json.dumps(asdict(progress), indent=2))

    def _rank_best(self, progress: Progress) -> None:
        """Carry the best checkpoint so far (lowest validation loss) from the newest earlier checkpoint's
        progress record into this one's, replaced by this one where its loss is lower."""
        earlier = [c for c in self.paths.checkpoints() if int(CHECKPOINT_RE.match(c.name).group(1)) < progress.step]
        try:
            before = read_progress(earlier[-1]) if earlier else None
        except ConfigError:  # damaged since (it was verified when resumed): rank from here
            before = None
        best = (before.best_eval_loss, before.best_step) if before and before.best_step is not None else None
        if progress.eval_loss is not None and (best is None or progress.eval_loss < best[0]):
            best = (progress.eval_loss, progress.step)
        progress.best_eval_loss, progress.best_step = best or (None, None)

    def _prune(self) -> None:
        """Keep the newest checkpoint.keep_last checkpoints, and under checkpoint.keep_best the one of the
        lowest validation loss (named by the newest one's progress record); never prune unless the newest
        one verifies."""
        keep, ckpts = self.cfg.checkpoint.keep_last, self.paths.checkpoints()
        if keep <= 0 or len(ckpts) <= keep:
            return
        if why := checkpoint_problem(ckpts[-1], deep=False):
            raise RunFault(f"{why}: the checkpoint just written does not verify; pruning nothing")
        best = read_progress(ckpts[-1]).best_step if self.cfg.checkpoint.keep_best else None
        for old in ckpts[:-keep]:
            if best is None or old != self.paths.checkpoint(best):
                shutil.rmtree(old, ignore_errors=True)

    def finalize(self, ckpt: Path, info: dict) -> None:
        """Rank 0 at the end: OUTPUT/adapter_model (a copy of the last adapter; train.method=full wrote
        OUTPUT/model before this, train/model_export.py) and the `completed` record."""
        record = {**info, "checkpoint": ckpt.name, "finished_at": time.time()}
        if self.full:
            atomic.write_text(self.paths.completed, json.dumps(record, indent=2))
            return
        with atomic.folder(self.paths.adapter, replace=True) as tmp:
            shutil.copytree(ckpt / "adapter_model", tmp, dirs_exist_ok=True)
        if why := manifest.matches(self.paths.adapter, ckpt, "adapter_model/"):
            raise RunFault(f"{why}: the final adapter does not match {ckpt.name} after copying it")
        atomic.write_text(self.paths.completed, json.dumps(record, indent=2))
