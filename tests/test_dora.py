"""DoRA (lora.variant=dora) on 2 CPU ranks: ZeRO-3 with the layer-wise NF4 loader, and ZeRO-2, bf16 compute;
and in the same launch the LoftQ and PiSSA starts (lora.init, model/adapter_init.py) under ZeRO-3, one resumed.

One launch (tests/workers/dora_cases.py) trains every case; the checks read what it wrote.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, TINY, load_adapter_tensors, read_metrics, run_cli, run_torchrun

pytestmark = pytest.mark.slow

DORA = [*TINY, "lora.variant=dora", "model.compute_dtype=bfloat16", "train.max_steps=4", "train.save_steps=2",
        "checkpoint.keep_last=0"]
CASES = ("zero3", "zero2")
INIT_CASES = {"loftq": ["lora.init=loftq", "lora.init_iters=2"], "pissa": ["lora.init=pissa"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dora")
    resumed = f"zero3-resumed:dist.ds_config=zero3,copy={out / 'zero3' / 'checkpoint-2'}"
    starts = [f"{name}:dist.ds_config=zero3,lora.variant=lora,{','.join(keys)}" for name, keys in INIT_CASES.items()]
    loftq_resumed = (f"loftq-resumed:dist.ds_config=zero3,lora.variant=lora,{','.join(INIT_CASES['loftq'])},"
                     f"copy={out / 'loftq' / 'checkpoint-2'}")
    # LoftQ under ZeRO-2 (its loader runs layer-wise there too), then a ZeRO-2 run started from the ZeRO-3
    # LoftQ adapter (train.init_adapter: lora.init and its iterations come from the adapter)
    zero2_start = f"loftq-zero2:dist.ds_config=zero2,lora.variant=lora,{','.join(INIT_CASES['loftq'])}"
    from_loftq = f"from-loftq:dist.ds_config=zero2,lora.variant=lora,train.init_adapter={out / 'loftq' / 'adapter_model'}"
    run_torchrun(2, str(out), *(f"{c}:dist.ds_config={c}" for c in CASES), resumed, *starts, loftq_resumed,
                 zero2_start, from_loftq, "--",
                 *DORA, script=str(REPO / "tests" / "workers" / "dora_cases.py"), timeout=600)
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


# ------------------------------------------------------------------ LoftQ and PiSSA starts, 2 ranks, ZeRO-3
@pytest.mark.parametrize("case", [*INIT_CASES, "loftq-zero2"])
def test_start_base_is_rebuilt_byte_for_byte_and_reproduces_the_logits(runs, case):
    """The NF4 base every rank trained on (computed by each rank's loader, partitioned by ZeRO-3, or whole
    under ZeRO-2) has the bytes `generate` rebuilds on one rank from the original weights and the adapter's
    qlora_dist.json; PeftModel.from_pretrained on that base gives the 2-rank run's logits."""
    from peft import PeftModel

    from qlora_dist import compat
    from qlora_dist.model import adapter_init, adapter_settings
    from qlora_dist.model.base import load_base_for
    from qlora_dist.model.builtin import resolve_model_path
    from workers.dora_cases import _base_sha256

    adapter = runs / case / "adapter_model"
    saved = json.loads((adapter / "qlora_dist.json").read_text())
    method = case.split("-")[0]
    assert (saved["lora_init"], saved["lora_init_iters"]) == ((method, 2) if method == "loftq" else (method, 1))
    loading = adapter_settings.base_loading(adapter, compute_dtype="bfloat16")
    assert isinstance(loading.init, adapter_init.AdapterInit) and loading.init.method == method
    base = load_base_for(resolve_model_path("tiny-llama"), loading)
    trained = json.loads((runs / case / "base_sha256.json").read_text())
    assert len(trained) == 14 and _base_sha256(base, zero3=False) == trained
    saved_logits = torch.load(runs / case / "trained_logits.pt")
    batch, want = saved_logits["batch"], saved_logits["logits"]
    model = PeftModel.from_pretrained(base, str(adapter), autocast_adapter_dtype=False).eval()
    compat.disable_cpu_weight_repacking(model)
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["attention_mask"].bool()
    diff, scale = (got - want)[mask].abs().max().item(), want[mask].abs().max().item()
    print(f"{case}: 2-rank ZeRO-3 logits vs one-rank rebuilt base + saved adapter: {diff:.3g} (scale {scale:.3g})")
    # ZeRO-2 trains through our fused LoRA path (ZeRO-3 hands its layers to peft's forward, as the reader
    # does): in bf16 the sums round differently, by up to one bf16 step (2^-7 relative) at the logits' scale
    assert diff <= (2 ** -7 if case.endswith("zero2") else 1e-3) * scale


def test_zero3_loftq_resumes_exactly_on_the_rebuilt_base(runs):
    """A resumed LoftQ run rebuilds its base from the original weights (config.yaml's lora.init) and ends
    with the uninterrupted run's adapter bit for bit."""
    full, resumed = (load_adapter_tensors(runs / c / "adapter_model") for c in ("loftq", "loftq-resumed"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    assert json.loads((runs / "loftq-resumed" / "base_sha256.json").read_text()) == \
        json.loads((runs / "loftq" / "base_sha256.json").read_text())


def test_a_run_from_a_loftq_adapter_trains_on_its_rebuilt_base(runs):
    """train.init_adapter of the ZeRO-3 LoftQ adapter, under ZeRO-2: the run rebuilds the adapter's LoftQ base
    (the same bytes as the ZeRO-3 and ZeRO-2 LoftQ runs'), starts from its weights, and saves an adapter that
    still says how its base is made."""
    base = json.loads((runs / "loftq" / "base_sha256.json").read_text())
    assert json.loads((runs / "from-loftq" / "base_sha256.json").read_text()) == base
    assert json.loads((runs / "loftq-zero2" / "base_sha256.json").read_text()) == base
    saved = json.loads((runs / "from-loftq" / "adapter_model" / "qlora_dist.json").read_text())
    assert (saved["lora_init"], saved["lora_init_iters"]) == ("loftq", 2)
    # it starts where the LoftQ run ended: its first loss is below the LoftQ run's first
    first = [m["loss"] for m in read_metrics(runs / "from-loftq") if "loss" in m][0]
    assert first < [m["loss"] for m in read_metrics(runs / "loftq") if "loss" in m][0]


def test_merge_of_a_loftq_adapter_uses_the_rebuilt_base(runs, tmp_path):
    """`qlora-dist merge` of a LoftQ adapter dequantizes the rebuilt base (not NF4 of the original weights):
    the merged 16-bit model gives the trained logits within bf16 rounding."""
    from transformers import AutoModelForCausalLM

    run_cli("merge", "--base", "tiny-llama", "--adapter", str(runs / "loftq" / "adapter_model"),
            "--out", str(tmp_path / "merged"), "--compute-dtype", "bfloat16")
    saved = torch.load(runs / "loftq" / "trained_logits.pt")
    batch, want = saved["batch"], saved["logits"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["attention_mask"].bool()
    diff, scale = (got - want)[mask].abs().max().item(), want[mask].abs().max().item()
    print(f"merged LoftQ model vs the trained logits: {diff:.3g} (scale {scale:.3g})")
    assert diff <= 0.03 * scale
