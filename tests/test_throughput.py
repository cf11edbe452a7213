"""MFU by the common convention: 6 x parameters x tokens/s per GPU over the datasheet peak."""
import pytest

from qlora_dist.errors import ConfigError
from qlora_dist.train.throughput import PEAK_ENV, Throughput


def test_mfu_per_gpu_from_the_table_and_the_environment(monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    # 7B, 2 GPUs, 16,384 tokens a step in 1 s: 8,192 tokens/s per GPU; 6 * 7e9 * 8192 / 989.4e12 = 34.8 %
    got = Throughput(7_000_000_000, 2, "NVIDIA H100 80GB HBM3").of(16_384, 1.0)
    assert got["tokens_per_s_per_gpu"] == 8192 and abs(got["mfu"] - 0.3478) < 1e-4
    assert got["mfu_peak"] == "datasheet (H100)"
    assert Throughput(1, 1, "NVIDIA H100 PCIe").peak == 756.0  # the specific name wins over "H100"
    cpu = Throughput(7_000_000_000, 1, "").of(100, 1.0)
    assert cpu["mfu"] is None and cpu["mfu_peak"] == f"no peak for CPU (set {PEAK_ENV})"
    monkeypatch.setenv(PEAK_ENV, "100")
    assert abs(Throughput(1_000_000_000, 1, "").of(1000, 1.0)["mfu"] - 0.06) < 1e-12
    monkeypatch.setenv(PEAK_ENV, "fast")
    with pytest.raises(ConfigError, match=PEAK_ENV):
        Throughput(1, 1, "")
