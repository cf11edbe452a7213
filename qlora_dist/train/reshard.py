"""Resume a checkpoint on a different number of ranks (e.g. 4 -> 2, 2 -> 1).

DeepSpeed's own `load_checkpoint` needs the world size the checkpoint was saved with: ZeRO-2 and ZeRO-3
store each rank's slice of flattened fp32 master weights and optimizer moments. Its universal-checkpoint
converter would re-slice them, but it only knows torch Adam's moment names (`exp_avg`, `exp_avg_sq`),
not bitsandbytes' (`state1`, `state2`). So here the saved slices are merged back into whole per-parameter
tensors with DeepSpeed's own merge routines (the ones `zero_to_fp32` uses for the weights, applied to
every optimizer state of the same layout), then written into the new partitions through DeepSpeed's
public `safe_set_full_*` API. Only LoRA parameters are involved: the frozen base is never in these files.
Every file is read with torch.load(weights_only=True) (compat.safe_torch_load), including inside
DeepSpeed's merge helpers, which would otherwise unpickle with code.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from qlora_dist import compat
from qlora_dist import dist


def _load_optimizer_files(engine_dir: Path) -> tuple[int, int, list[dict]]:
    from deepspeed.utils import zero_to_fp32 as z2f

    files = z2f.get_optim_files(str(engine_dir))
    states = [compat.safe_torch_load(f)["optimizer_state_dict"] for f in files]
    stage = states[0]["zero_stage"]
    world = states[0]["partition_count"]
    world = max(world) if isinstance(world, list) else world
    return stage, world, states


# bitsandbytes 0.50.2's Optimizer8bit.state_dict nests its state tensors under this key (to hide them from
# FSDP's gathering); unnest them to see the state as the optimizer holds it.
BNB_NESTED = "__bnb_optimizer_quant_state__"


def _group_states(saved_rank: dict, stage: int) -> list[dict]:
    """One saved rank's client-optimizer state, one flat dict per parameter group."""
    base = saved_rank["base_optimizer_state"] if stage <= 2 else saved_rank["optimizer_state_dict"]
    base = base["state"] if isinstance(base, dict) and "state" in base else base
    groups = base if isinstance(base, list) else [base[i] for i in sorted(base)]
    return [{**{k: v for k, v in g.items() if k != BNB_NESTED}, **g.get(BNB_NESTED, {})} for g in groups]


def _flat_groups(states: list[dict], stage: int, key: str) -> list[list[torch.Tensor]]:
    """Per saved rank, per parameter group: the flat slice of the fp32 masters or of one optimizer state."""
    if key == "fp32":
        return [s["single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"] for s in states]
    return [[g[key] for g in _group_states(s, stage)] for s in states]


def _state_keys(states: list[dict], stage: int) -> tuple[list[str], dict]:
    """Tensor states laid out like the fp32 slice (the moments) and scalar states (the step count)."""
    fp32 = _flat_groups(states[:1], stage, "fp32")[0][0]
    first = _group_states(states[0], stage)[0]
    tensors = [k for k, v in first.items() if torch.is_tensor(v) and v.shape == fp32.shape and v.dtype == fp32.dtype]
    other = [k for k, v in first.items() if torch.is_tensor(v) and k not in tensors and v.numel() > 1]
    if other:  # e.g. 8-bit states with per-block constants: block boundaries move with the slicing
        raise RuntimeError(f"cannot reshard optimizer states {other} (quantized states); resume on the "
                           "checkpoint's own world size, or train with a 32-bit optimizer")
    return tensors, {k: v for k, v in first.items() if k not in tensors}


def _zero_step(base, flat: list[torch.Tensor], step) -> None:
    for p in flat:
        p.grad = torch.zeros_like(p)
    step()
    for p in flat:
        p.grad = None


def _materialize_optimizer_state(engine) -> None:
    """Client optimizers create their state at the first step (bitsandbytes lazily, per parameter):
    one step on zero gradients creates it, so that every state tensor exists to be overwritten."""
    opt = engine.optimizer
    base = opt.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        # ZeRO-3 (deepspeed 0.19.8) hands the client optimizer one sub-group at a time, through
        # _optimizer_step, and leaves its param_groups empty in between.
        for i, flat in enumerate(opt.fp32_partitioned_groups_flat):
            if not base.state.get(flat):
                _zero_step(base, [flat], lambda: opt._optimizer_step(i))
        return
    flat = [p for group in base.param_groups for p in group["params"]]
    if not all(base.state.get(p) for p in flat):
        _zero_step(base, flat, base.step)
    # ZeRO-1/2 map each weight onto its optimizer-state slices lazily, after the first real step; the
    # safe_set_full_optimizer_state calls below need that map now.
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._lazy_init_hp_params_optimizer_state()


def merged_lora_state(engine_dir: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """{parameter name: {"fp32": whole tensor, <state key>: whole tensor}}, and the scalar states."""
    from deepspeed.utils import zero_to_fp32 as z2f

    stage, world, states = _load_optimizer_files(engine_dir)
    with compat.weights_only_torch_load():
        model_states = z2f.parse_model_states(z2f.get_model_state_files(str(engine_dir)))
    keys, scalars = _state_keys(states, stage)
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for key in ["fp32", *keys]:
        flat = _flat_groups(states, stage, key)
        out: OrderedDict = OrderedDict()
        # DeepSpeed 0.19.8's merge routines (private, as used by its zero_to_fp32 script): they know the
        # partition layout, padding and alignment of each stage.
        if stage <= 2:
            z2f._zero2_merge_trainable_params(out, world, flat, model_states, states[0].get("param_alignment_paddings"))
        else:
            z2f._zero3_merge_trainable_params(out, world, flat, model_states)
        for name, tensor in out.items():
            merged.setdefault(name, {})[key] = tensor.contiguous().clone()
    return merged, scalars


def restore(engine, ckpt: Path) -> None:
    """Load the LoRA weights, fp32 masters, optimizer states and LR schedule of `ckpt` into an engine
    whose world size differs from the checkpoint's."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from deepspeed.utils import zero_to_fp32 as z2f

    engine_dir = ckpt / "engine"
    stage = engine.zero_optimization_stage()
    merged, scalars = merged_lora_state(engine_dir)
    _materialize_optimizer_state(engine)
    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    missing = sorted(set(params) ^ set(merged))
    if missing:
        raise RuntimeError(f"{engine_dir}: trainable parameters differ from the checkpoint's: {missing[:5]}")
    for name, p in params.items():
        safe_set_full_fp32_param(p, merged[name]["fp32"].to(p.device))
        for key, value in merged[name].items():
            if key != "fp32":
                safe_set_full_optimizer_state(p, value.to(p.device), key)
    # The 16-bit weights the forward pass uses are the fp32 masters rounded, as after any step.
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        if dist.is_main() or stage < 3:
            for name, p in params.items():
                p.data.copy_(merged[name]["fp32"].view_as(p).to(p.dtype))
    base = engine.optimizer.optimizer  # the client optimizer inside ZeRO
    for state in base.state.values():
        state.update({k: v for k, v in scalars.items() if k != BNB_NESTED})
    model_state = compat.safe_torch_load(z2f.get_model_state_files(str(engine_dir))[0])
    if engine.lr_scheduler is not None and model_state.get("lr_scheduler"):
        engine.lr_scheduler.load_state_dict(model_state["lr_scheduler"])
    engine.global_steps = model_state.get("global_steps", engine.global_steps)
    engine.global_samples = model_state.get("global_samples", engine.global_samples)
