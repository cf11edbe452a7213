"""DoRA (lora.variant=dora) on 2 CPU ranks: ZeRO-3 with the layer-wise NF4 loader, and ZeRO-2, bf16 compute.

One launch (tests/workers/dora_cases.py) trains both cases; the checks read what it wrote.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, TINY, load_adapter_tensors, read_metrics, run_torchrun

pytestmark = pytest.mark.slow

DORA = [*TINY, "lora.variant=dora", "model.compute_dtype=bfloat16", "train.max_steps=4", "train.save_steps=2",
        "checkpoint.keep_last=0"]
CASES = ("zero3", "zero2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dora")
    resumed = f"zero3-resumed:dist.ds_config=zero3,copy={out / 'zero3' / 'checkpoint-2'}"
    run_torchrun(2, str(out), *(f"{c}:dist.ds_config={c}" for c in CASES), resumed, "--", *DORA,
                 script=str(REPO / "tests" / "workers" / "dora_cases.py"), timeout=400)
    return out


@pytest.fixture(scope="module")
def one_rank_row_norms(tiny_model_dir):
    """The row norms of every full dequantized NF4 weight, computed on one rank from transformers' load."""
    import bitsandbytes as bnb

    from qlora_dist.model.base import load_base
    from qlora_dist.model.loader import row_norms

    base = load_base(tiny_model_dir, bits=4)
    return {name: row_norms(m) for name, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _module(key: str) -> str:
    return key.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0]


@pytest.mark.parametrize("case", CASES)
def test_dora_magnitude_starts_at_row_norms_trains_and_is_saved(runs, case, one_rank_row_norms):
    from safetensors.torch import load_file

    start = load_file(str(runs / case / "magnitudes-start.safetensors"))
    saved = load_adapter_tensors(runs / case / "adapter_model")
    magnitudes = {k: v for k, v in saved.items() if "lora_magnitude_vector" in k}
    assert len(magnitudes) == len(start) == 2 * 7  # every linear layer of both decoder layers
    assert json.loads((runs / case / "adapter_model" / "adapter_config.json").read_text())["use_dora"] is True
    for key, value in start.items():
        norms = one_rank_row_norms[_module(key)]
        # bf16 weights and norms: the one-rank norm (peft's own value, tests/test_model.py), exactly
        assert torch.equal(value, norms.to(torch.bfloat16).float()), key
        moved = (magnitudes[key].float() - value).abs().max().item()
        assert moved > 0, f"{key}: DoRA's magnitude did not change in 4 bf16 steps"
    losses = [m["loss"] for m in read_metrics(runs / case) if "loss" in m]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_zero3_and_zero2_dora_agree(runs):
    a, b = (load_adapter_tensors(runs / c / "adapter_model") for c in CASES)
    gap = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"ZeRO-3 vs ZeRO-2 DoRA adapters: max difference {gap:.3g}")
    assert a.keys() == b.keys() and gap < 0.02  # bf16 weights; a few units in the last place


@pytest.mark.parametrize("case", CASES)
def test_saved_dora_adapter_reproduces_trained_logits(runs, case, tiny_model_dir):
    """PeftModel.from_pretrained on a fresh one-rank NF4 base gives the 2-rank run's logits: exactly with
    the adapter in the dtype it was trained and saved in (bf16); within 1% of the logits' range when peft
    upcasts it to fp32 (its default), far below what the adapter changes."""
    from peft import PeftModel

    from qlora_dist import compat
    from qlora_dist.model.base import load_base

    saved = torch.load(runs / case / "trained_logits.pt")
    batch, want = saved["batch"], saved["logits"]
    mask = batch["attention_mask"].bool()
    results = {}
    for upcast in (False, True):
        base = load_base(tiny_model_dir, bits=4, compute_dtype="bfloat16")
        model = PeftModel.from_pretrained(base, str(runs / case / "adapter_model"), autocast_adapter_dtype=upcast).eval()
        compat.disable_cpu_weight_repacking(model)
        with torch.no_grad():
            results[upcast] = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            with model.disable_adapter():
                plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    scale, effect = want[mask].abs().max().item(), (plain - want)[mask].abs().max().item()
    exact, upcast = ((results[u] - want)[mask].abs().max().item() for u in (False, True))
    print(f"{case}: logits diff {exact:.3g} (bf16 adapter), {upcast:.3g} (fp32), adapter's effect {effect:.3g}")
    assert exact == 0.0
    assert upcast <= 0.01 * scale and effect > 20 * upcast


def test_zero3_dora_resumes_exactly(runs):
    """Step 2's checkpoint continued to step 4 (same 2 ranks, so dropout's RNG carries over) ends with the
    uninterrupted run's adapter, magnitudes included, bit for bit."""
    full, resumed = (load_adapter_tensors(runs / c / "adapter_model") for c in ("zero3", "zero3-resumed"))
    assert full.keys() == resumed.keys() and sum("lora_magnitude_vector" in k for k in full) == 14
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert [m["loss"] for m in read_metrics(runs / "zero3-resumed") if "loss" in m] == \
        [m["loss"] for m in read_metrics(runs / "zero3") if "loss" in m][2:]
