"""An adapter's qlora_dist.json decides the base it is served and merged on (FP4, no double quant here)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from qlora_dist.errors import ConfigError
from qlora_dist.model import adapter_settings


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def fp4_adapter(tiny_model_dir, tmp_path_factory):
    """(adapter folder, logits of the model that saved it): LoRA with non-zero B on an FP4 base without
    double quantization, in float32 compute (so the comparison is not blurred by bf16 rounding)."""
    from peft import LoraConfig, get_peft_model

    from qlora_dist.model.base import load_base, lora_target_names

    base = load_base(tiny_model_dir, 4, "fp4", False, "float32")
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=lora_target_names(base),
                                            task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    out = tmp_path_factory.mktemp("fp4") / "adapter_model"
    model.save_pretrained(out)
    adapter_settings.write(out, base_model="tiny-llama", bits=4, quant_type="fp4", double_quant=False,
                           compute_dtype="float32")
    ids = torch.randint(4, 512, (3, 24), generator=torch.Generator().manual_seed(0))
    with model.disable_adapter():
        untuned = _logits(model, ids)
    return out, ids, _logits(model, ids), untuned


def test_write_read_and_malformed_files(tmp_path):
    adapter_settings.write(tmp_path, base_model="m", bits=4, quant_type="fp4", double_quant=False,
                           compute_dtype="bfloat16")
    assert adapter_settings.read(tmp_path) == {"base_model": "m", "bits": 4, "quant_type": "fp4",
                                               "double_quant": False, "compute_dtype": "bfloat16",
                                               "prompt_template": "guanaco", "lora_init": "default",
                                               "lora_init_iters": 1}
    assert adapter_settings.read(tmp_path / "other") is None  # e.g. an adapter made by another tool
    path = tmp_path / adapter_settings.FILE
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=rf"{path}: not valid JSON"):
        adapter_settings.read(tmp_path)
    path.write_text(json.dumps({"base_model": "m", "bits": 3, "quant_type": "int4", "double_quant": False,
                                "compute_dtype": "float32", "lora_init": "olora", "lora_init_iters": 0}))
    with pytest.raises(ConfigError) as err:
        adapter_settings.read(tmp_path)
    assert [p.split(": ", 2)[1] for p in err.value.problems] == ["bits", "quant_type", "prompt_template", "lora_init",
                                                                 "lora_init_iters"]
    with pytest.raises(ValueError, match="compute_dtype='auto'"):  # the caller must pass the resolved dtype
        adapter_settings.write(tmp_path, base_model="m", bits=4, quant_type="nf4", double_quant=True,
                               compute_dtype="auto")


def test_inference_loads_the_base_the_adapter_was_trained_on(fp4_adapter, tiny_model_dir, tmp_path, capsys):
    import bitsandbytes as bnb

    from qlora_dist.evaluate.generate import load_for_inference

    adapter, ids, want, untuned = fp4_adapter
    model, _ = load_for_inference(str(tiny_model_dir), str(adapter), compute_dtype="float32")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_state.quant_type == "fp4" and not m.weight.quant_state.nested
                          for m in layers)
    assert "4-bit FP4 without double quant" in capsys.readouterr().err
    diff = (_logits(model, ids) - want).abs().max().item()
    # The recipe's default base (NF4 + double quant) is another base: the adapter would be served wrong.
    nf4, _ = load_for_inference(str(tiny_model_dir), str(adapter), compute_dtype="float32", quant_type="nf4",
                                double_quant=True)
    nf4_diff = (_logits(nf4, ids) - want).abs().max().item()
    adapter_effect = (untuned - want).abs().max().item()
    print(f"FP4 adapter served on FP4: max abs logit diff {diff:.3g}; on NF4 + double quant: {nf4_diff:.3g}; "
          f"the adapter itself moves logits by {adapter_effect:.3g}")
    assert diff <= 1e-5  # same quantized weights, same fp32 arithmetic
    assert nf4_diff > 100 * max(diff, 1e-5)
    # Without qlora_dist.json (another tool's adapter): the recipe's NF4 + double quant.
    bare = tmp_path / "bare"
    shutil.copytree(adapter, bare)
    (bare / adapter_settings.FILE).unlink()
    assert adapter_settings.base_loading(bare, compute_dtype="float32") == adapter_settings.BaseLoading(
        4, "nf4", True, "float32")


def test_generate_command_reports_the_base_and_dtype(fp4_adapter, tiny_model_dir, capsys):
    from qlora_dist.cli import main

    adapter = fp4_adapter[0]
    assert main(["generate", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--prompt", "Hi",
                 "--max-new-tokens", "2", "--compute-dtype", "float32"]) == 0
    err = capsys.readouterr().err
    assert f"4-bit FP4 without double quant (from {adapter / adapter_settings.FILE})" in err
    assert "compute dtype float32 (set explicitly)" in err


def test_merge_uses_the_adapters_base(fp4_adapter, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from qlora_dist.model.merge import merge

    adapter, ids, want, untuned = fp4_adapter
    out = merge(str(tiny_model_dir), adapter, tmp_path / "merged", "bf16", compute_dtype="float32")
    diff = (_logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids) - want).abs().max().item()
    bare = tmp_path / "bare"
    shutil.copytree(adapter, bare)
    (bare / adapter_settings.FILE).unlink()  # merged into the recipe's NF4 base instead
    nf4_out = merge(str(tiny_model_dir), bare, tmp_path / "merged_nf4", "bf16", compute_dtype="float32")
    nf4_diff = (_logits(AutoModelForCausalLM.from_pretrained(nf4_out).eval(), ids) - want).abs().max().item()
    scale = (want.max() - want.min()).item()
    adapter_effect = (untuned - want).abs().max().item()
    print(f"merged (bf16) vs FP4 base + adapter: max abs logit diff {diff:.3g} ({100 * diff / scale:.2f}% of the "
          f"range); merged on NF4 instead: {nf4_diff:.3g}; the adapter moves logits by {adapter_effect:.3g}")
    # The merged weights are W_fp4 + BA rounded once to bf16: allow 2% of the logits' range (as
    # test_generate_merge does), well below what the adapter changes and what the wrong base changes.
    assert diff <= 0.02 * scale
    assert adapter_effect > 10 * diff and nf4_diff > 3 * diff


def test_commands_that_run_a_model_take_a_compute_dtype():
    from qlora_dist.cli import build_parser

    parser = build_parser()
    for cmd in (["generate", "--base", "b", "--prompt", "p"], ["eval", "mmlu", "--base", "b", "--data", "d"],
                ["merge", "--base", "b", "--adapter", "a", "--out", "o"]):
        assert parser.parse_args(cmd).compute_dtype == "auto"
        assert parser.parse_args([*cmd, "--compute-dtype", "float32"]).compute_dtype == "float32"
    assert parser.parse_args(["generate", "--base", "b", "--prompt", "p"]).bits is None  # the adapter's, else 4
    assert parser.parse_args(["merge", "--base", "b", "--adapter", "a", "--out", "o"]).dtype == "bf16"
