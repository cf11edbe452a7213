"""The run plan: what a run's `auto` values resolve to on the machine and world size it runs on.

The user's config keeps `auto` (and is saved as given, in config.yaml); the plan holds the resolved
compute dtype (by capability, precision.py), micro batch and activation checkpointing (by the memory cap,
memory.py), and the accumulation that keeps the global batch. It is logged once, written to metrics.jsonl
and saved beside config.yaml in every checkpoint. Resuming resolves it anew, so a run that used `auto`
continues on another world size or under another cap.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

from qlora_dist import memory, precision, recipe
from qlora_dist.config import AUTO_NEEDS_CAP, Config, parse_config, parse_size
from qlora_dist.errors import ConfigError


def parse_run_config(path=None, preset: str | None = None, overrides: list[str] = ()) -> tuple[Config, list[str]]:
    """The run's config from the user's YAML, preset and overrides, with every problem found in it: the one
    place a command builds it (config.parse_config holds the schema). A dataset alone (`--preset oasst1`,
    recipe.DATASET_PRESETS) first takes its size class from model.path's parameter count (memory.sized_preset
    reads the model's config.json; the config's own problems, if any, are reported instead)."""
    errs = []
    if preset in recipe.DATASET_PRESETS:
        first, first_errs = parse_config(path, None, overrides)  # its problems are found again below
        try:
            preset = None if first_errs else memory.sized_preset(preset, first)
        except ConfigError as exc:
            errs, preset = list(exc.problems), None
    cfg, more = parse_config(path, preset, overrides)
    return cfg, errs + more


def load_run_config(path=None, preset: str | None = None, overrides: list[str] = ()) -> Config:
    """parse_run_config, raising every problem at once."""
    cfg, errs = parse_run_config(path, preset, overrides)
    if errs:
        raise ConfigError(errs)
    return cfg


@dataclass(frozen=True)
class RunPlan:
    world_size: int
    compute_dtype: str
    compute_dtype_why: str
    micro_batch_size: int
    gradient_checkpointing: bool | str  # True, False or "offload"
    grad_accum: int
    planned_gb_per_rank: float | None = None  # with train.max_memory_per_gpu: the memory plan's total
    cap_gb: float | None = None
    sequence_parallel: int = 1  # dist.sequence_parallel: ranks per group sharing each row

    def apply(self, cfg: Config) -> Config:
        """A copy of the user's config with the resolved values: what the model and engine are built from."""
        resolved = copy.deepcopy(cfg)
        resolved.model.compute_dtype = self.compute_dtype
        resolved.train.micro_batch_size = self.micro_batch_size
        resolved.model.gradient_checkpointing = self.gradient_checkpointing
        return resolved

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        memory_part = (f"; memory plan {self.planned_gb_per_rank:.2f} GB per rank under the cap of "
                       f"{self.cap_gb:.2f} GB" if self.cap_gb else "")
        return (f"compute dtype {self.compute_dtype} ({self.compute_dtype_why}); micro batch {self.micro_batch_size} "
                f"x accumulation {self.grad_accum} x {self._ranks()}; activation checkpointing "
                f"{_on_off(self.gradient_checkpointing)}{memory_part}")


    def _ranks(self) -> str:
        n = self.sequence_parallel
        if n == 1:
            return f"{self.world_size} rank(s)"
        return f"{self.world_size // n} group(s) of {n} ranks sharing each row (dist.sequence_parallel={n})"


def _on_off(checkpointing: bool | str) -> str:
    return "on, inputs offloaded to host memory" if checkpointing == "offload" else "on" if checkpointing else "off"


@dataclass(frozen=True)
class PreparedRun:
    """What the preflight resolves once, on rank 0, and hands to every rank's trainer (launch/job.py; the
    other ranks receive it by broadcast): the user's config with a starting adapter's lora.* values adopted,
    the run plan, and the DeepSpeed config built from both. No later phase derives any of them again."""
    config: Config
    plan: RunPlan
    ds: dict


def _micro_batch(cfg: Config, world_size: int, cap: int, on_gpu: bool | None) -> tuple[int, bool]:
    """train.micro_batch_size=auto: the fastest (micro batch, checkpointing) that fits the cap; the
    smallest plan when none does (the cap check then names what does not fit)."""
    chosen = memory.choose_micro_batch(cfg, world_size, cap, on_gpu=on_gpu)
    offload = cfg.model.gradient_checkpointing == "offload"  # kept where checkpointing is chosen
    ckpt = ("offload" if offload else True) if (chosen is None or chosen.checkpointing) else False
    return (chosen.micro_batch if chosen else 1), ckpt


def resolve(cfg: Config, world_size: int, cuda: bool | None = None) -> RunPlan:
    """The plan of `cfg` on `world_size` ranks (CUDA or not: this machine unless said); ConfigError when
    the memory cap cannot hold the run, with the plan and the cheapest change that fits."""
    dtype, why = precision.resolve_compute_dtype(cfg.model.compute_dtype, cuda=cuda)
    micro, ckpt = cfg.train.micro_batch_size, cfg.model.gradient_checkpointing
    cap = parse_size(cfg.train.max_memory_per_gpu) if cfg.train.max_memory_per_gpu else None
    if micro == "auto" and not cap:  # the config check says so too; the preflight reports it once
        raise ConfigError([AUTO_NEEDS_CAP])
    if cap and micro == "auto":
        micro, ckpt = _micro_batch(cfg, world_size, cap, cuda)
    plan = RunPlan(world_size, dtype, why, int(micro), ckpt, 0, sequence_parallel=cfg.dist.sequence_parallel)
    # ConfigError when the batch does not divide; the ranks of a sequence-parallel group share their rows
    accum = plan.apply(cfg).train.grad_accum(cfg.dist.data_parallel(world_size))
    if not cap:
        return RunPlan(**{**plan.to_json(), "grad_accum": accum})
    memory_plan = memory.make_plan(memory.setup_from_config(plan.apply(cfg), world_size, on_gpu=cuda), cap)
    if not memory_plan.fits:
        fix = memory.suggest(memory_plan.setup, cap)
        raise ConfigError([f"train.max_memory_per_gpu: {cfg.train.max_memory_per_gpu} cannot hold this run "
                           f"(planned {memory_plan.total / memory.GB:.2f} GB per rank; to fit: "
                           + ("; then ".join(fix) if fix else "no single change found, see `qlora-dist plan`") + ")"])
    return RunPlan(**{**plan.to_json(), "grad_accum": accum, "planned_gb_per_rank": memory_plan.total / memory.GB,
                      "cap_gb": cap / memory.GB})
