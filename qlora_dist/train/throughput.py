"""Tokens per second per GPU and model FLOPs utilization (MFU), for the bar, metrics.jsonl and the benches.

MFU follows the common convention (PaLM, Megatron, nanoGPT): 6 x parameters x tokens/s per GPU over the
GPU's dense bf16 datasheet peak, parameters counted whole (base and LoRA; 4-bit weights as weights, not
storage). It is a yardstick for comparing runs, not a count of the work done: with a frozen base the backward
skips the weight gradients of the base (about a third of the 6), and activation checkpointing adds a second
forward that the 6 does not count either. The peak comes from QLORA_DIST_PEAK_TFLOPS or the table below; a
device with neither (a CPU, an unlisted GPU) gets the field all the same, with `mfu` None and a note saying so.
"""
from __future__ import annotations

import os

PEAK_ENV = "QLORA_DIST_PEAK_TFLOPS"

# Dense bf16 tensor-core TFLOP/s from the vendor's datasheets (no sparsity), matched in order against
# torch.cuda.get_device_name(): the more specific names first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
    ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0),
]


def peak_tflops(device_name: str | None) -> tuple[float | None, str]:
    """(peak TFLOP/s or None, where it came from)."""
    env = os.environ.get(PEAK_ENV)
    if env:
        try:
            peak = float(env)
        except ValueError:
            peak = 0.0
        if not peak > 0:
            from qlora_dist.errors import ConfigError

            raise ConfigError([f"{PEAK_ENV}: the GPU's peak in TFLOP/s, a positive number (got {env!r})"])
        return peak, PEAK_ENV
    if device_name:
        for key, tflops in PEAK_BF16_TFLOPS:
            if key.lower() in device_name.lower():
                return tflops, f"datasheet ({key})"
    return None, f"no peak for {device_name or 'CPU'} (set {PEAK_ENV})"


def current_device_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


class Throughput:
    """Per-GPU tokens/s and MFU of a model with `parameters` weights trained on `world_size` ranks; under
    dist.sequence_parallel also per group (`groups` of world_size / N ranks, each sharing its rows)."""

    def __init__(self, parameters: int, world_size: int, device_name: str | None = None, *, groups: int | None = None):
        self.parameters, self.world_size = parameters, world_size
        self.groups = groups or world_size
        self.peak, self.peak_source = peak_tflops(device_name if device_name is not None else current_device_name())

    def of(self, tokens: float, seconds: float) -> dict:
        per_gpu = tokens / max(seconds, 1e-9) / self.world_size
        per_group = {} if self.groups == self.world_size else {
            "tokens_per_s_per_group": tokens / max(seconds, 1e-9) / self.groups}
        return {"tokens_per_s_per_gpu": per_gpu, **per_group, "mfu": mfu(self.parameters, per_gpu, self.peak),
                "mfu_peak": self.peak_source}


def mfu(parameters: int, tokens_per_s_per_gpu: float, peak: float | None) -> float | None:
    return None if not peak else 6 * parameters * tokens_per_s_per_gpu / (peak * 1e12)
