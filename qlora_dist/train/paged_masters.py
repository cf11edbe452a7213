"""fp32 master weights in paged (CUDA unified) memory: `optim.master_weights=paged`.

DeepSpeed 0.19.8 keeps an fp32 copy of this rank's share of the bf16 LoRA weights in the GPU allocator: the
tensors the client optimizer steps (ZeRO-1/2: DeepSpeedZeroOptimizer.single_partition_of_fp32_groups; ZeRO-3:
DeepSpeedZeroOptimizer_Stage3.fp32_partitioned_groups_flat; ZeRO-1 with bf16 and fp32 gradient accumulation:
BF16_Optimizer.fp32_groups_flat_partition). The recipe's paged AdamW already keeps its states in CUDA unified
memory (bitsandbytes' get_paged: cudaMallocManaged, outside torch's caching allocator, evicted to host RAM by
the driver under pressure); here the masters join them, 4 bytes per LoRA parameter less in the allocator.

How: each master's *storage* is swapped (`t.data = new`), never the tensor object, so whatever holds the object
stays valid: DeepSpeed's lists, the optimizer's param_groups and the bitsandbytes state keyed on it. The views
DeepSpeed built of the old storage (ZeRO-1/2's and BF16_Optimizer's `_hp_mapping.hp_fragment` of each LoRA
weight, behind safe_get/set_full_fp32_param and resharding) are rebuilt on the new one. DeepSpeed's
load_checkpoint copies into the existing masters (`current.data.copy_(saved)` in stage_1_and_2.py, stage3.py
and bf16_optimizer.py of 0.19.8), so calling page_masters again after a load moves nothing; were a later
version to replace them, the new ones would be moved then.

`cuda_paged_like` runs only on CUDA; on CPU tests swap in a stand-in allocator (tests/test_paged_masters.py).
The CUDA path itself (cuda_paged_like) has not run yet: bench/gpu_issue14.sh (bench/paged_masters_ab.py) checks
it when a GPU is lent.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch

from qlora_dist import compat
from qlora_dist import dist

# Where deepspeed 0.19.8 keeps this rank's fp32 masters, by optimizer wrapper (see the docstring).
MASTER_LISTS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")
_TYPESTR = {torch.float32: "<f4", torch.float16: "<f2"}  # numpy type strings of the CUDA array interface
_MOVED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> master moved on this rank


def master_tensors(optimizer) -> list[torch.Tensor]:
    """DeepSpeed's fp32 master tensors of this rank (one flat tensor per parameter group or sub-group)."""
    for attr in MASTER_LISTS:
        if found := getattr(optimizer, attr, None):
            return list(found)
    raise RuntimeError(f"optim.master_weights=paged: found no fp32 master weights on {type(optimizer).__name__} "
                       f"(looked for {', '.join(MASTER_LISTS)}, deepspeed 0.19.8's names); a DeepSpeed upgrade may "
                       "have moved them: use optim.master_weights=gpu")


def _is_moved(t: torch.Tensor) -> bool:
    return getattr(t, "_paged_data_ptr", None) == t.data_ptr()


def page_masters(engine, allocate: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Move every master not moved yet into the storage `allocate(t)` returns (same shape, dtype and device,
    values copied); returns the bytes moved (0 when all were moved already)."""
    optimizer = engine.optimizer
    # ZeRO-3 with fp32 weights uses the weights' own flat partition as the master: nothing separate to move.
    weights = {id(t) for t in getattr(optimizer, "fp16_partitioned_groups_flat", None) or []}
    moved = 0
    for t in master_tensors(optimizer):
        if id(t) in weights or t.numel() == 0 or _is_moved(t):
            continue
        new = allocate(t.detach())
        if (new.shape, new.dtype, new.device) != (t.shape, t.dtype, t.device):
            raise RuntimeError(f"paged masters: the allocator returned {new.dtype} {tuple(new.shape)} on {new.device} "
                               f"for {t.dtype} {tuple(t.shape)} on {t.device}")
        t.data = new
        for attr in ("is_paged", "page_deviceid"):  # as bitsandbytes marks its paged tensors
            if hasattr(new, attr):
                setattr(t, attr, getattr(new, attr))
        t._paged_data_ptr = t.data_ptr()
        _MOVED[id(t)] = t
        moved += t.numel() * t.element_size()
    if moved:
        compat.relink_deepspeed_fragments(optimizer, masters_moved=True)
        del new
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the old masters' blocks back (they count in reserved memory)
    return moved


def apply(engine, cfg, when: str) -> int:
    """Under optim.master_weights=paged, move this rank's masters that are not in paged memory yet (all of
    them at set-up; after a checkpoint load, only ones DeepSpeed replaced). Rank 0 says what moved."""
    if cfg.optim.master_weights != "paged":
        return 0
    moved = page_masters(engine, cuda_paged_like)
    if moved or when == "set-up":
        dist.log(f"optim.master_weights=paged ({when}): {moved / 1e9:.2f} GB of fp32 master weights moved to paged "
                 f"(unified) memory on rank 0, outside the allocator; {paged_masters_gb():.2f} GB there in all")
    return moved


def paged_masters_gb() -> float:
    """GB of this rank's masters in paged memory (outside the allocator, like the paged optimizer states)."""
    return sum(t.numel() * t.element_size() for t in list(_MOVED.values()) if _is_moved(t)) / 1e9


class _ManagedArray:
    """A CUDA array interface over bitsandbytes' managed buffer, for torch.as_tensor. It keeps the buffer's
    CPU-typed tensor alive as long as the CUDA tensor lives (bitsandbytes 0.50.2 never frees get_paged memory
    either: a master lives as long as the run)."""

    def __init__(self, host_view: torch.Tensor, shape: torch.Size, dtype: torch.dtype):
        self.host_view = host_view
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": _TYPESTR[dtype],
                                         "data": (host_view.data_ptr(), False), "version": 2, "strides": None}


def cuda_paged_like(t: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor like `t` (values copied) in CUDA unified memory, outside torch's caching allocator (so
    outside max_memory_allocated and the allocator cap). bitsandbytes' get_paged returns a CPU-typed tensor
    over cudaMallocManaged memory; torch wraps the same pointer as a CUDA tensor through the CUDA array
    interface. GPU only; checked on a GPU by bench/paged_masters_ab.py."""
    if t.device.type != "cuda":
        raise RuntimeError(f"optim.master_weights=paged: paged (unified) memory exists only on CUDA GPUs "
                           f"(the masters are on {t.device})")
    if t.dtype not in _TYPESTR:
        raise RuntimeError(f"optim.master_weights=paged: cannot page {t.dtype} masters (only {list(_TYPESTR)})")
    from bitsandbytes.functional import get_paged

    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    host_view = get_paged(*t.shape, dtype=t.dtype, device=torch.device("cuda", index))
    new = torch.as_tensor(_ManagedArray(host_view, t.shape, t.dtype), device=t.device)
    if new.data_ptr() != host_view.data_ptr():  # torch copied it into its allocator: not what we want
        raise RuntimeError(f"paged masters: torch placed the managed buffer on {new.device}, not {t.device}")
    new.is_paged, new.page_deviceid = True, index
    new.copy_(t)
    return new
