"""optim.master_weights=paged (qlora_dist/train/paged_masters.py): the fp32 masters' storage swapped for paged
(CUDA unified) memory. On CPU a stand-in allocator proves the mechanics on real DeepSpeed ranks (ZeRO-2 and
ZeRO-3, bf16): the optimizer steps the moved storage, the run is bitwise the run without the move, and a
checkpoint loads into the moved masters. The config and preflight errors, and the planner's figures."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import REPO, TINY, run_torchrun
from qlora_dist import memory
from qlora_dist.cli import main
from qlora_dist.config import load_config
from qlora_dist.errors import ConfigError
from qlora_dist.train import paged_masters

PAGED = "keep fp32 masters in paged memory (optim.master_weights=paged)"
STEPS, SAVE_AT = 4, 2  # tests/workers/paged_masters_cases.py


@pytest.mark.slow
def test_moved_masters_train_bitwise_like_deepspeeds_and_survive_a_checkpoint(tmp_path):
    run_torchrun(2, str(tmp_path), "zero2,zero3", *TINY, "model.compute_dtype=bfloat16", "lora.dropout=0",
                 "train.micro_batch_size=2", "train.global_batch_size=4",
                 script=str(REPO / "tests" / "workers" / "paged_masters_cases.py"), timeout=120)
    rows = json.loads((tmp_path / "paged_masters.json").read_text())
    assert sorted((r["stage"], r["rank"]) for r in rows) == [("zero2", 0), ("zero2", 1), ("zero3", 0), ("zero3", 1)]
    for stage in ("zero2", "zero3"):
        ranks = [r for r in rows if r["stage"] == stage]
        lora, tensors = ranks[0]["lora_numel"], ranks[0]["lora_tensors"]
        # (a) the masters found cover every LoRA parameter once, up to DeepSpeed's padding
        assert lora <= sum(r["master_numel"] for r in ranks) < lora + 2 * tensors + 4, (stage, lora)
    for r in rows:
        where = (r["stage"], r["rank"])
        assert r["masters_moved"] and r["moved_again"] == 0, where  # all moved at set-up, once
        assert abs(r["moved_gb"] - r["master_gb"]) < 1e-12 and r["master_gb"] > 0, where  # paged_masters_gb
        # (b) the optimizer steps the new storage, in place, and the bf16 weights follow it (through
        # DeepSpeed's own weight-to-master links, rebuilt by page_masters)
        assert r["stepped_the_moved"] and r["masters_updated_in_place"] and r["weights_are_rounded_masters"], where
        # (c) bitwise the run whose masters stayed where DeepSpeed put them
        assert r["moved_losses"] == r["reference_losses"] and r["moved_equals_reference"], where
        # (d) DeepSpeed's load copies into the moved masters: nothing to move again, the run continues the same
        assert r["moved_after_load"] == 0 and r["still_moved_after_load"], where
        assert r["resumed_losses"] == r["moved_losses"][SAVE_AT:] and r["resumed_equals_moved"], where


def _plan_lines(capsys, *overrides: str) -> list[str]:
    assert main(["plan", "--shape", "65b", "--world-size", "2", "--gpu-memory", "24GB", "dist.ds_config=zero3",
                 "train.micro_batch_size=1", *overrides]) == 0
    return capsys.readouterr().out.splitlines()


def test_planner_moves_the_masters_outside_the_allocator(capsys):
    """65B, ZeRO-3 on 2 x 24 GB without offload: 23.58 GB with the masters on the GPU, 21.98 GB paged (2.0 GB
    to spare); `plan` accepts the key on a machine without CUDA (planning is not running)."""
    gpu = _plan_lines(capsys)
    paged = _plan_lines(capsys, "optim.master_weights=paged")
    assert any(line.split() == ["total", "on", "the", "GPU", "23.58", "GB"] for line in gpu)
    assert any(line.split() == ["total", "on", "the", "GPU", "21.98", "GB"] for line in paged)
    assert any(line.split()[:1] == ["master_weights_fp32"] and line.split()[-2:] == ["1.60", "GB"] for line in gpu)
    assert any("master_weights_fp32 (paged, unified memory)" in line and "1.60 GB" in line for line in paged)


def test_planner_suggests_paged_masters_before_zero3_and_offload():
    cfg = load_config(overrides=["model.path=llama-65b", "dist.ds_config=zero3", "train.micro_batch_size=1"])
    setup = memory.setup_from_config(cfg, 2, memory.Shape.llama("65b"), on_gpu=True)
    assert not setup.paged_masters
    assert memory.suggest(setup, int(23e9)) == [PAGED]  # 23.58 GB does not fit 23 GB; 21.98 GB does
    cfg = load_config(overrides=["model.path=llama-65b", "dist.ds_config=zero3", "optim.master_weights=paged"])
    assert memory.setup_from_config(cfg, 2, memory.Shape.llama("65b"), on_gpu=True).paged_masters
    for already in (replace(setup, paged_masters=True), replace(setup, offload_optimizer=True),
                    replace(setup, on_gpu=False)):  # not offered where it is, cannot be, or does nothing
        assert PAGED not in [text for text, _ in memory.cheaper_changes(already, int(23e9))]
    # with the optimizer offloaded, or without CUDA, the masters stay where they were planned
    for where in (replace(setup, paged_masters=True, offload_optimizer=True),
                  replace(setup, paged_masters=True, on_gpu=False)):
        items, outside = memory.lora_items(where)
        assert "master_weights_fp32" in {**items, **outside}
        assert "master_weights_fp32 (paged, unified memory)" not in outside


def _check(capsys, tmp_path, *args: str) -> tuple[int, list[str], str]:
    code = main(["check", *TINY, f"train.output_dir={tmp_path / 'run'}", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.startswith("qlora-dist: error: ")], out


def test_preflight_refuses_paged_masters_with_offload_or_without_cuda(capsys, tmp_path):
    code, lines, _ = _check(capsys, tmp_path, "optim.master_weights=paged", "dist.ds_config=zero3_offload")
    assert code == 2 and len(lines) == (1 if torch.cuda.is_available() else 2), lines
    assert "optim.master_weights: paged, but" in lines[0] and "offload_optimizer" in lines[0]
    if not torch.cuda.is_available():
        assert "optim.master_weights: paged (unified) memory exists only on CUDA GPUs" in lines[1]
    # planned for GPUs (a cap given): accepted, and the plan shows where the masters went
    code, lines, out = _check(capsys, tmp_path, "optim.master_weights=paged", "--gpu-memory", "24GB")
    assert code == 0 and not lines and "master_weights_fp32 (paged, unified memory)" in out
    with pytest.raises(ConfigError, match="optim.master_weights: 'host' is not allowed; choose one of gpu, paged"):
        load_config(overrides=["optim.master_weights=host"])


def test_cuda_allocator_and_lookup_fail_clearly_on_their_own():
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="paged \\(unified\\) memory exists only on CUDA GPUs"):
            paged_masters.cuda_paged_like(torch.zeros(4))

    class NotZero:  # e.g. a DeepSpeed upgrade that renamed the masters
        pass
    with pytest.raises(RuntimeError, match="found no fp32 master weights on NotZero"):
        paged_masters.master_tensors(NotZero())


def test_a_checkpoint_resumes_with_the_masters_moved_or_not():
    from qlora_dist.train.checkpoint import config_differences

    saved = load_config(overrides=["optim.master_weights=gpu"]).to_dict()
    assert config_differences(saved, load_config(overrides=["optim.master_weights=paged"])) == []


def test_a_loaded_paged_optimizer_pages_its_states_again():
    """bitsandbytes 0.50.2 loads a paged optimizer's states as ordinary tensors (its next step would put them
    in the GPU allocator): compat.repage_optimizer_states copies them into paged buffers again. CUDA is
    stood in for: `page` marks CPU buffers as bitsandbytes marks paged ones."""
    import bitsandbytes as bnb

    from qlora_dist import compat

    torch.manual_seed(0)
    grads = [torch.randn(100_000) for _ in range(3)]
    a, b = torch.nn.Parameter(torch.randn(100_000)), torch.nn.Parameter(torch.zeros(100_000))
    small = torch.nn.Parameter(torch.randn(10))  # under 1e5 elements: bitsandbytes never pages it
    first = bnb.optim.PagedAdamW32bit([a, small], lr=1e-2)
    a.grad, small.grad = grads[0], torch.ones(10)
    first.step()
    b.data.copy_(a.data)
    again = bnb.optim.PagedAdamW32bit([b, torch.nn.Parameter(small.detach().clone())], lr=1e-2)
    again.load_state_dict(first.state_dict())
    pages = []

    def page(p, dtype):
        t = torch.zeros_like(p, dtype=dtype)
        t.is_paged = True
        pages.append(t)
        return t

    assert compat.repage_optimizer_states(again, page=page, on_device=lambda p: True) == 2 * 4 * 100_000
    assert [again.state[b][k] for k in ("state1", "state2")] == pages  # the same objects: paged now
    assert all(torch.equal(again.state[b][k], first.state[a][k]) for k in ("state1", "state2"))
    assert compat.repage_optimizer_states(again, page=page, on_device=lambda p: True) == 0  # once only
    assert compat.repage_optimizer_states(torch.optim.AdamW([a]), page=page) == 0  # not a paged optimizer
    for t in pages:  # on CPU the step must not prefetch them (bitsandbytes' CUDA call)
        del t.is_paged
    for g in grads[1:]:
        a.grad, b.grad = g, g.clone()
        first.step(), again.step()
    assert torch.equal(a, b)  # the moved states are the ones it steps
