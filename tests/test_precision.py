"""Compute dtype by capability: CPU flags in, dtype out (no model, no torch kernels)."""
from __future__ import annotations

import pytest

from qlora_dist.errors import ConfigError
from qlora_dist.precision import DTYPE_ENV, cpu_flags, resolve_compute_dtype

AVX2 = {"fpu", "sse2", "avx", "avx2", "fma"}
AVX512_NO_BF16 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}


@pytest.mark.parametrize("cuda, flags, want", [
    (False, AVX512_NO_BF16 | {"avx512_bf16"}, "bfloat16"),
    (False, AVX2 | {"amx_bf16", "amx_tile"}, "bfloat16"),
    (False, AVX2, "float32"),
    (False, AVX512_NO_BF16, "float32"),  # AVX-512 alone is not native bf16 (torch's mkldnn check says yes)
    (False, set(), "float32"),  # no /proc/cpuinfo (not Linux)
    (True, AVX2, "bfloat16"),  # CUDA: the recipe's bf16, whatever the host CPU
])
def test_auto_follows_the_machine(cuda, flags, want):
    name, why = resolve_compute_dtype("auto", environ={}, cuda=cuda, flags=flags)
    assert name == want and why


def test_environment_overrides_auto_but_not_an_explicit_value():
    env = {DTYPE_ENV: "float32"}
    assert resolve_compute_dtype("auto", env, cuda=True, flags=set())[0] == "float32"
    assert resolve_compute_dtype("auto", {DTYPE_ENV: "bfloat16"}, cuda=False, flags=AVX2)[0] == "bfloat16"
    assert resolve_compute_dtype("float16", env, cuda=False, flags=AVX2) == ("float16", "set explicitly")
    assert resolve_compute_dtype("bfloat16", {}, cuda=False, flags=AVX2)[0] == "bfloat16"


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match=rf"\${DTYPE_ENV}: 'bf16' is not a dtype"):
        resolve_compute_dtype("auto", {DTYPE_ENV: "bf16"}, cuda=False, flags=AVX2)


def test_cpu_flags_reads_the_first_cpu(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
                       "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu other\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert cpu_flags(tmp_path / "absent") == set()
    assert resolve_compute_dtype("auto", {}, cuda=False, flags=cpu_flags(cpuinfo))[0] == "bfloat16"


@pytest.mark.slow
def test_demo_trains_in_float32(tmp_path):
    """The path an AVX2-only CPU takes by default (auto -> float32): 3 steps of the demo model, batch 4."""
    import math

    from conftest import read_metrics, run_cli

    out = tmp_path / "demo"
    run_cli("train", "--preset", "demo", "train.max_steps=3", "train.global_batch_size=4",
            "train.micro_batch_size=4", "eval.at_start=false", "eval.at_end=false", "model.compute_dtype=float32",
            f"train.output_dir={out}", timeout=300)
    rows = read_metrics(out)
    assert [r["compute_dtype"] for r in rows if r.get("event") == "plan"] == ["float32"]
    losses = [r["loss"] for r in rows if "loss" in r and r.get("event") is None]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
