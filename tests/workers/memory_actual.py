"""Run under torchrun: for each case, build the real engine, take one step, and write what each rank really
holds beside what the planner says, item by item (rank 0 writes OUT/NAME/memory_actual.json). The cases
share one process group (imports and DeepSpeed set-up paid once per launch).

usage: memory_actual.py OUT NAME:key=value,key=value ... -- key=value ...   (the keys after -- apply to all)"""
from __future__ import annotations

import json

import torch

from qlora_dist import compat

compat.set_library_env()
compat.quiet_known_warnings()

import bitsandbytes as bnb  # noqa: E402

from qlora_dist import memory

from qlora_dist import dist  # noqa: E402
from qlora_dist.config import load_config  # noqa: E402
from qlora_dist.launch.job import prepare  # noqa: E402
from qlora_dist.train.trainer import Trainer  # noqa: E402


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _held(p: torch.nn.Parameter) -> int:
    return _bytes(p.ds_tensor) if hasattr(p, "ds_tensor") else _bytes(p.data)


def _quant_state_bytes(qs) -> int:
    total = _bytes(qs.absmax) + _bytes(qs.code) + (_bytes(qs.offset) if torch.is_tensor(qs.offset) else 0)
    if qs.state2 is not None:
        total += _bytes(qs.state2.absmax) + _bytes(qs.state2.code)
    return total


def actual(trainer) -> dict[str, int]:
    model, opt = trainer.engine.module, trainer.engine.optimizer
    items = {"base_nf4": 0, "quant_constants": 0, "base_16bit": 0, "lora_weights": 0}
    for p in model.parameters():
        if p.requires_grad:
            items["lora_weights"] += _held(p)
        elif isinstance(p, bnb.nn.Params4bit):
            items["base_nf4"] += _held(p)
            items["quant_constants"] += _quant_state_bytes(p.quant_state)
        else:
            items["base_16bit"] += _held(p)
    flats = getattr(opt, "fp32_partitioned_groups_flat", None) or opt.single_partition_of_fp32_groups
    items["master_weights_fp32"] = sum(_bytes(t) for t in flats)
    grads = {"bytes": 0}
    base = opt.optimizer
    original = base.step

    def counting_step(*a, **k):  # the gradients the optimizer is handed, as it steps
        grads["bytes"] += sum(_bytes(p.grad) for g in base.param_groups for p in g["params"] if p.grad is not None)
        return original(*a, **k)

    base.step = counting_step
    trainer._train_step()
    base.step = original
    items["lora_grads_fp32"] = grads["bytes"]
    items["optimizer_states"] = sum(_bytes(v) for st in base.state.values() for v in st.values() if torch.is_tensor(v)
                                    and v.numel() > 1)
    return items


def measure(cfg) -> None:
    trainer = Trainer(cfg, prepare(cfg))
    trainer.setup()
    got = actual(trainer)
    plan = memory.make_plan(memory.setup_from_config(cfg, trainer.info.world_size, on_gpu=False))
    rows = dist.gather_objects({"rank": trainer.info.rank, "actual": got, "planned": plan.items})
    if trainer.info.is_main:
        with open(f"{cfg.train.output_dir}/memory_actual.json", "w") as f:
            json.dump(rows, f, indent=2)
    dist.barrier()
    trainer.cleanup()


def run_case(folder, overrides: list[str]) -> None:
    measure(load_config(overrides=[*overrides, f"train.output_dir={folder}"]))


if __name__ == "__main__":
    from train_cases import run_as_script  # this folder is the script's: on sys.path

    run_as_script(run_case)
