"""Dtypes and the quantization config, in one place.

The compute dtype is chosen by capability (`model.compute_dtype=auto`, the default): bf16 on CUDA, as the
recipe, and on CPUs that multiply bf16 natively; fp32 on other CPUs. On an AVX2 CPU without native bf16
(AMD EPYC, torch 2.13, one thread, 512x576x1536) a bf16 matmul ran at 1.3 GFLOP/s against 66 GFLOP/s in
fp32: the demo took 107-232 s a step in bf16 and 5.3 s in fp32. Native bf16 is read from the CPU flags
(`avx512_bf16` or `amx_bf16`), not from torch's mkldnn bf16 check, which also says yes on AVX-512 CPUs
without native bf16 (../shared/STACK-NOTES.md). The storage of the base (NF4/FP4, double quantization) is
the run's; only the dtype the matmuls run in is the machine's.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
COMPUTE_DTYPES = ("auto", *DTYPES)
QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit data types (quantization.quant_type)
# Overrides what `auto` picks on this machine (e.g. float32 to compare, bfloat16 to test the recipe's
# numerics on a slow CPU). An explicit model.compute_dtype still wins.
DTYPE_ENV = "QLORA_DIST_COMPUTE_DTYPE"
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The flags of the first CPU in /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def auto_compute_dtype(cuda: bool, flags: set[str]) -> tuple[str, str]:
    """(dtype name, why) that `auto` means on a machine with these properties."""
    if cuda:
        return "bfloat16", "CUDA (the recipe's bf16)"
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if native:
        return "bfloat16", f"CPU with native bf16 ({native[0]})"
    return "float32", "CPU without native bf16 (no avx512_bf16/amx_bf16 flag): bf16 matmuls would run ~50x slower"


def resolve_compute_dtype(requested: str, environ=os.environ, cuda: bool | None = None,
                          flags: set[str] | None = None) -> tuple[str, str]:
    """(dtype name, why) for model.compute_dtype (or a command's --compute-dtype): an explicit dtype is
    kept; `auto` takes $QLORA_DIST_COMPUTE_DTYPE if set, else the machine's capability."""
    if requested != "auto":
        return requested, "set explicitly"
    override = environ.get(DTYPE_ENV)
    if override:
        if override not in DTYPES:
            from .errors import ConfigError

            raise ConfigError([f"${DTYPE_ENV}: {override!r} is not a dtype; choose one of {', '.join(DTYPES)}"])
        return override, f"${DTYPE_ENV}"
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return auto_compute_dtype(cuda, cpu_flags() if flags is None else flags)


def dtype_name(requested: str) -> str:
    """model.compute_dtype as a dtype name (`auto` resolved for this machine): for code given the user's
    config rather than the run plan's resolved copy (tests, benches), which then resolves alike."""
    return resolve_compute_dtype(requested)[0]


def quantization_config(bits: int, quant_type: str = "nf4", double_quant: bool = True,
                        compute_dtype: str = "bfloat16"):
    """The BitsAndBytesConfig of the recipe (None for a 16-bit base; LLM.int8 for 8); compute_dtype is a
    resolved name."""
    if bits == 16:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 8:  # bitsandbytes' LLM.int8 (the paper's Int8 rows): int8 weights, fp16 outliers
        return BitsAndBytesConfig(load_in_8bit=True)

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=DTYPES[compute_dtype],
        # ZeRO-3 partitions parameters by dtype with the rest of the model: the packed NF4 data must be
        # stored in the model's dtype, not uint8 (../shared/STACK-NOTES.md). Same bytes, same results.
        bnb_4bit_quant_storage=DTYPES[compute_dtype],
    )
