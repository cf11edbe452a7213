"""The DeepSpeed engine: its JSON config from `ds_configs/` plus the values our config derives.

A ds_configs file says how ZeRO partitions and communicates. Batch sizes, accumulation, clipping,
precision and the LR schedule come from our config: they are filled where the JSON says "auto", and a
JSON value that contradicts ours is an error naming both, never silently one or the other.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from qlora_dist import compat
from qlora_dist.config import Config
from qlora_dist.ds_files import read_ds_config
from qlora_dist.errors import ConfigError
from qlora_dist.precision import dtype_name


def _scheduler(cfg: Config) -> dict[str, Any] | None:
    o, steps = cfg.optim, cfg.train.max_steps
    if o.scheduler == "constant":
        if o.warmup_steps == 0:
            return None  # the optimizer's LR, untouched
        params = {"warmup_min_lr": 0.0, "warmup_max_lr": o.lr, "warmup_num_steps": o.warmup_steps}
        return {"type": "WarmupLR", "params": {**params, "warmup_type": "linear"}}
    if o.scheduler == "linear":
        params = {"total_num_steps": steps, "warmup_min_lr": 0.0, "warmup_max_lr": o.lr,
                  "warmup_num_steps": o.warmup_steps}
        return {"type": "WarmupDecayLR", "params": {**params, "warmup_type": "linear"}}
    params = {"total_num_steps": steps, "warmup_min_ratio": 0.0, "warmup_num_steps": o.warmup_steps,
              "cos_min_ratio": 0.0}
    return {"type": "WarmupCosineLR", "params": {**params, "warmup_type": "linear"}}


def derived_values(cfg: Config, world_size: int) -> dict[str, Any]:
    """Dotted DS keys whose values our config decides."""
    dtype = dtype_name(cfg.model.compute_dtype)  # `auto` resolved, as the run plan does
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum(cfg.dist.data_parallel(world_size)),
        "train_batch_size": cfg.train.global_batch_size,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "bf16.enabled": dtype == "bfloat16",
        # A NaN/inf gradient norm skips the step, as an fp16 overflow does (model/loss.py makes a non-finite
        # loss such a gradient). deepspeed 0.19.8 ZeRO-1/2 skips on it in fp32 always, in bf16 only with this
        # (its default, stated so a ds_configs file cannot turn it off unnoticed); ZeRO-3 always.
        "bf16.check_grad_overflow": True,
        "fp16.enabled": dtype == "float16",
    }


def _sequence_parallel_values(cfg: Config) -> dict[str, Any]:
    """DeepSpeed 0.19.8 counts a batch over world / sequence_parallel_size ranks: from the Ulysses mpu in
    deepspeed.initialize, from this key where there is none yet (zero.Init of the layer-wise ZeRO-3 load)."""
    n = cfg.dist.sequence_parallel
    return {"sequence_parallel_size": n} if n > 1 else {}


def _set_checked(ds: dict[str, Any], dotted: str, value: Any, source: str, problems: list[str]) -> None:
    *parents, leaf = dotted.split(".")
    node = ds
    for p in parents:
        node = node.setdefault(p, {})
    current = node.get(leaf, "auto")
    if current != "auto" and current != value:
        problems.append(f"{source}: {dotted} is {current!r} but our config gives {value!r}; "
                        f"set it to \"auto\" or change the config")
    node[leaf] = value


def build_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    raw, source = read_ds_config(cfg.dist.ds_config)
    ds, problems = copy.deepcopy(raw), []
    for key in ("optimizer", "scheduler"):
        if key in ds:
            problems.append(f"{source}: remove {key!r}: the {key} comes from our config (optim.*)")
    for dotted, value in {**derived_values(cfg, world_size), **_sequence_parallel_values(cfg)}.items():
        _set_checked(ds, dotted, value, source, problems)
    if problems:
        raise ConfigError(problems)
    sched = _scheduler(cfg)
    if sched:
        ds["scheduler"] = sched
    offload = ds.get("zero_optimization", {}).get("offload_optimizer")
    if offload and not torch.cuda.is_available():
        offload["pin_memory"] = False  # pinning needs CUDA
    return ds


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    o = cfg.optim
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    classes = {
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_32bit": bnb.optim.AdamW32bit,
        "adamw_torch": torch.optim.AdamW,
    }
    return classes[o.name](params, **kwargs)


# The Ulysses attention registered in this process (compat.register_ulysses): its shape and its mpu.
_ULYSSES: dict[tuple, Any] = {}


def sequence_parallel_mpu(cfg: Config, model: torch.nn.Module):
    """None for dist.sequence_parallel=1; else DeepSpeed's Ulysses groups (mpu) for deepspeed.initialize:
    without it the engine sees a sequence-parallel world of 1 and averages gradients over every rank.
    Registered once per process (DeepSpeed allows one); a later engine of the same process (tests train
    several runs in one process group) reuses it if its shape is the same, else it cannot be served."""
    n = cfg.dist.sequence_parallel
    if n == 1:
        compat.forget_deepspeed_mpu()
        return None
    compat.use_ulysses(model)
    text = model.config.get_text_config()
    attention = model.config._attn_implementation
    key = (n, int(cfg.train.micro_batch_size), attention, text.num_attention_heads,
           text.num_key_value_heads, text.num_hidden_layers)
    if not _ULYSSES:
        _ULYSSES[key] = compat.register_ulysses(model, attention, n, int(cfg.train.micro_batch_size))
    if key not in _ULYSSES:
        raise RuntimeError(f"this process registered Ulysses attention for {next(iter(_ULYSSES))} "
                           f"(sequence parallel, micro batch, attention, heads, KV heads, layers); a run with "
                           f"{key} needs a process of its own")
    return _ULYSSES[key]


def initialize(cfg: Config, model: torch.nn.Module, ds: dict[str, Any]):
    """deepspeed.initialize with our client optimizer (and, under dist.sequence_parallel, the Ulysses
    mpu); returns the engine, in train mode, its fp32 masters moved to paged memory under
    optim.master_weights=paged (train/paged_masters.py)."""
    import deepspeed

    from qlora_dist.train import paged_masters

    # train.method=full hands every weight here, as LoRA hands its adapter: the same path. Its mixed precision
    # is DeepSpeed's own ZeRO bf16 optimizer (deepspeed 0.19.8 stage_1_and_2.py / stage3.py with bf16.enabled):
    # the module keeps bf16 weights, the ZeRO optimizer an fp32 master partition of them, and our client
    # optimizer (optim.name) steps those masters, so its Adam moments are fp32 too. Not ours, because
    # DeepSpeed's layout is what its checkpoints, the finite checks on the masters (train/checkpoint.py) and
    # reshard read, and what ZeRO-2/3 partition; a second master copy of our own would double 4 bytes a weight.
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(cfg, params),
                                           model_parameters=params, config=ds,
                                           mpu=sequence_parallel_mpu(cfg, model))
    compat.engine_train_mode(engine)
    paged_masters.apply(engine, cfg, "set-up")
    return engine


def paged_optimizer_gb() -> float:
    """GB of the paged optimizer's states (bitsandbytes keeps them in CUDA unified memory, outside the
    allocator that `max_memory_allocated` counts): reported beside the allocator's peak, never hidden.
    0 on CPU, where bitsandbytes 0.50.2 falls back to ordinary tensors."""
    import sys

    if "bitsandbytes" not in sys.modules:
        return 0.0
    from bitsandbytes.functional import GlobalPageManager

    return sum(t.numel() * t.element_size() for t in GlobalPageManager.get_instance().paged_tensors) / 1e9
