"""How an adapter's weights start (`lora.init`), and the base that goes with a start that changes it.

default, gaussian: peft's own (A random, B zero: the base is untouched).
loftq, pissa: B·A starts non-zero and the base becomes whatever W - s·B·A leaves, so both are computed
here, in the layer-wise loader, while each layer's 16-bit weights are still in hand (before NF4 and before
ZeRO-3 partitions it). With s the LoRA scaling (alpha/r, or alpha/sqrt(r) under rsLoRA):
  loftq (LoftQ, Li et al. 2023): T alternating steps from B·A = 0:  Q_t = NF4(W - s·B·A);  s·B·A = the
        best rank-r approximation of W - deq(Q_t) (truncated SVD). The base is Q_T, the adapter its B·A.
  pissa (PiSSA, Meng et al. 2024): s·B·A = the top-r singular part of W; the base is the residual
        W - s·B·A, quantized (or kept in 16 bits).
Why ours and not peft 0.21.2's: its LoftQ calls CUDA directly (utils/loftq_utils.py), its
init_lora_weights="loftq" path needs scipy, both put the residual into B·A without the scaling and
quantize without double quantization (unlike our base); its PiSSA refuses a 4-bit layer. The maths
here is theirs, with our quantization (bitsandbytes' quantize_4bit, exactly as Params4bit calls it)
and the scaling.

Determinism: the base must be rebuilt bit for bit wherever the adapter is loaded (every ZeRO-3 rank,
`generate`, `merge`, resume), so each SVD runs in fp32 on one CPU thread (LAPACK's result can depend on
the thread count) and the quantization is the loader's own, on the same 16-bit input.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

# Methods whose start changes the base (the loader computes them); the others are peft's init_lora_weights.
BASE_CHANGING = ("loftq", "pissa")
PEFT_INIT = {"default": True, "gaussian": "gaussian", "loftq": True, "pissa": True}  # -> LoraConfig
INIT_WEIGHTS = "_qlora_init_lora"  # attribute of a base linear layer: (A, B) in fp32, for add_lora
BLOCKSIZE = 64  # bitsandbytes 0.50.2 Params4bit's default, which the loader's Linear4bit uses


@dataclass(frozen=True)
class AdapterInit:
    """A base-changing start: the method, its steps, and what fixes the maths (rank, scaling, layers)."""
    method: str  # one of BASE_CHANGING
    iters: int
    r: int
    scaling: float
    targets: frozenset[str] | None  # last name components of the LoRA layers; None: every linear but lm_head

    def applies_to(self, module_name: str) -> bool:
        return self.targets is None or module_name.rsplit(".", 1)[-1] in self.targets

    def split(self, weight: torch.Tensor, quant: dict | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(what the base stores before quantization, in weight's dtype; A; B in fp32) of one layer."""
        if self.method == "pissa":
            return pissa(weight, self.r, self.scaling)
        *_, (pre, a, b) = loftq_steps(weight, self.r, self.scaling, self.iters, quant)
        return pre, a, b


def scaling(alpha: float, r: int, rslora: bool) -> float:
    """peft 0.21.2's LoRA scaling (LoraLayer.update_layer)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def _targets(target_modules) -> frozenset[str] | None:
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return None if names == ["all-linear"] else frozenset(names)


def from_config(cfg) -> AdapterInit | None:
    """The run's base-changing start, or None (lora.init default or gaussian)."""
    lora = cfg.lora
    if lora.init not in BASE_CHANGING:
        return None
    return AdapterInit(lora.init, lora.init_iters, lora.r, scaling(lora.alpha, lora.r, lora.rslora),
                       _targets(lora.target_modules))


def from_adapter(adapter_dir: Path | str, recorded: dict | None) -> AdapterInit | None:
    """The start an adapter folder records (qlora_dist.json's lora_init, `recorded`), with the rank,
    scaling and layers of its adapter_config.json; None when its base is the plain one."""
    if not recorded or recorded.get("lora_init", "default") not in BASE_CHANGING:
        return None
    peft = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    r = int(peft["r"])
    return AdapterInit(recorded["lora_init"], int(recorded.get("lora_init_iters", 1)), r,
                       scaling(float(peft["lora_alpha"]), r, bool(peft.get("use_rslora", False))),
                       _targets(peft["target_modules"]))


@contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def best_rank_r(matrix: torch.Tensor, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s·B·A the best rank-r approximation of `matrix` (Eckart-Young: truncated SVD), the
    singular values shared evenly between B and A as peft's PiSSA does. fp32, one thread (deterministic)."""
    with _one_thread():
        u, sv, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    root = torch.sqrt(sv[:r] / s)
    # contiguous: LAPACK's U comes column-major, and DeepSpeed broadcasts parameters as byte views
    return (root[:, None] * vh[:r]).contiguous(), (u[:, :r] * root[None, :]).contiguous()


def pissa(weight: torch.Tensor, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA of one weight: (W - s·B·A in weight's dtype, A, B) with s·B·A its top-r singular part."""
    a, b = best_rank_r(weight, r, s)
    with _one_thread():
        residual = weight.float() - s * (b @ a)
    return residual.to(weight.dtype), a, b


def quantize_roundtrip(weight: torch.Tensor, quant: dict) -> torch.Tensor:
    """deq(Q(weight)) with the loader's quantization (Params4bit._quantize's call, bitsandbytes 0.50.2)."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE,
                                       compress_statistics=quant["double_quant"], quant_type=quant["quant_type"],
                                       quant_storage=quant["compute_dtype"])
    return bnbf.dequantize_4bit(packed, state)


def loftq_steps(weight: torch.Tensor, r: int, s: float, iters: int, quant: dict | None):
    """LoftQ's alternating steps on one weight; yields (pre_t, A_t, B_t) per step t = 1..iters, where the
    base of step t is Q(pre_t) and s·B_t·A_t is the best rank-r approximation of W - deq(Q(pre_t))."""
    if quant is None:
        raise ValueError("LoftQ needs a quantized base (quantization.bits=4): a 16-bit base has no error")
    w = weight.float()
    low = torch.zeros_like(w)
    for _ in range(iters):
        with _one_thread():
            pre = (w - low).to(weight.dtype)
        a, b = best_rank_r(w - quantize_roundtrip(pre, quant).float(), r, s)
        with _one_thread():
            low = s * (b @ a)
        yield pre, a, b


def place_init_weights(model: torch.nn.Module) -> int:
    """Copy each base layer's computed (A, B) into its peft LoRA layer (after get_peft_model built them
    with peft's default start) and free them. Returns the number of layers set."""
    count = 0
    for module in model.modules():
        base = module.get_base_layer() if hasattr(module, "lora_A") and hasattr(module, "get_base_layer") else None
        weights = base.__dict__.pop(INIT_WEIGHTS, None) if base is not None else None
        if weights is None:
            continue
        a, b = weights
        for name in module.lora_A:
            lora_a, lora_b = module.lora_A[name].weight, module.lora_B[name].weight
            lora_a.data = a.to(device=lora_a.device, dtype=lora_a.dtype)
            lora_b.data = b.to(device=lora_b.device, dtype=lora_b.dtype)
        count += 1
    return count


def drop_init_weights(model: torch.nn.Module) -> None:
    """Free computed starts that a loaded adapter's weights replace."""
    for module in model.modules():
        module.__dict__.pop(INIT_WEIGHTS, None)
