"""Batched generation into FastChat answer files, and merging an adapter into a plain 16-bit model."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TEST_DATA, run_torchrun

VICUNA = TEST_DATA / "vicuna_bench"  # the two FastChat question files, whole


def _random_adapter(base_dir, out_dir, seed: int = 0):
    """A LoRA adapter on every linear layer with non-zero B (a fresh one is the identity), saved as PEFT."""
    from peft import LoraConfig, get_peft_model

    from qlora_dist.model.base import load_base, lora_target_names

    base = load_base(base_dir, bits=4)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=lora_target_names(base),
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param, dtype=torch.float32) * 0.2)
    model.save_pretrained(out_dir)
    return out_dir


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_model_matches_adapter_on_nf4_base(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    from qlora_dist import compat
    from qlora_dist.cli import main
    from qlora_dist.errors import ConfigError
    from qlora_dist.model.base import load_adapter, load_base
    from qlora_dist.model.merge import merge

    adapter = _random_adapter(tiny_model_dir, tmp_path / "adapter")
    out = merge(str(tiny_model_dir), adapter, tmp_path / "merged", "bf16")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".merged.tmp-*"))

    ids = torch.randint(4, 512, (3, 24), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain: no quantization_config needed
    reference = load_adapter(load_base(tiny_model_dir, bits=4), adapter, trainable=False).eval()
    compat.disable_cpu_weight_repacking(reference)
    want, got = _logits(reference, ids), _logits(merged, ids)
    with reference.disable_adapter():
        untuned = _logits(reference, ids)
    diff, scale = (got - want).abs().max().item(), (want.max() - want.min()).item()
    adapter_effect = (untuned - want).abs().max().item()
    print(f"merged vs NF4 base + adapter: max abs logit diff {diff:.4g}, logit range {scale:.4g} "
          f"({100 * diff / scale:.2f}%); the adapter itself moves logits by {adapter_effect:.4g}")
    # The merged weights are W_nf4 + BA rounded once to bf16 (~3 significant digits) where the reference
    # adds the LoRA path in fp32: allow 2% of the logits' range, well below what the adapter changes.
    assert diff <= 0.02 * scale
    assert adapter_effect > 10 * diff
    # Merging into the original bf16 weights instead of the dequantized NF4 ones drifts further off.
    naive = load_adapter(load_base(tiny_model_dir, bits=16), adapter, trainable=False).merge_and_unload().eval()
    naive_diff = (_logits(naive, ids) - want).abs().max().item()
    print(f"merging into the original (not dequantized) weights instead: max abs logit diff {naive_diff:.4g}")
    assert naive_diff > 2 * diff

    with pytest.raises(ConfigError, match="refusing to overwrite"):
        merge(str(tiny_model_dir), adapter, out)
    capsys.readouterr()
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def _check_judge_rows(rows: list[dict], question_ids: list, turns: list[int] | None = None) -> None:
    assert [r["question_id"] for r in rows] == question_ids
    for r, n in zip(rows, turns or [1] * len(rows)):
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert len(r["choices"]) == 1 and r["choices"][0]["index"] == 0
        assert [type(t) for t in r["choices"][0]["turns"]] == [str] * n
        assert len(r["answer_id"]) == 22 and isinstance(r["tstamp"], float)
    assert len({r["answer_id"] for r in rows}) == len(rows)


@pytest.mark.slow
def test_vicuna_answers_on_two_ranks_in_fastchat_schema(tmp_path, tiny_model_dir):
    questions = [json.loads(line) for line in (VICUNA / "fastchat_llm_judge" / "question.jsonl").read_text().splitlines()]
    out = tmp_path / "answers.jsonl"
    run_torchrun(2, "generate", "--base", str(tiny_model_dir), "--prompts", str(VICUNA / "fastchat_llm_judge" / "question.jsonl"),
                 "--out", str(out), "--max-new-tokens", "4", "--batch-size", "16", "--model-id", "tiny")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 80
    _check_judge_rows(rows, [q["question_id"] for q in questions])
    assert {r["model_id"] for r in rows} == {"tiny"}


def test_old_eval_table_schema_and_single_prompt(tmp_path, tiny_model_dir, capsys):
    from qlora_dist.cli import main

    out = tmp_path / "answers.jsonl"
    source = VICUNA / "fastchat_eval_table" / "question.jsonl"
    assert main(["generate", "--base", str(tiny_model_dir), "--prompts", str(source), "--out", str(out),
                 "--max-new-tokens", "3", "--batch-size", "40", "--temperature", "0.7", "--top-p", "0.9"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == list(range(1, 81))
    assert all(set(r) == {"question_id", "text", "answer_id", "model_id", "metadata"} and r["metadata"] == {}
               and isinstance(r["text"], str) and r["model_id"] == tiny_model_dir.name for r in rows)
    assert main(["generate", "--base", str(tiny_model_dir), "--prompt", "What is 2 + 2?", "--max-new-tokens", "3"]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["hi"]}\n{"question_id": 2, "prompt": "x"}\n')
    capsys.readouterr()
    assert main(["generate", "--base", str(tiny_model_dir), "--prompts", str(bad), "--out", str(out)]) == 2
    assert f"{bad}:2: expected" in capsys.readouterr().err


def test_multi_turn_answers_see_the_earlier_turns(tiny_model_dir, monkeypatch):
    from qlora_dist.data.prompts import guanaco_conversation, guanaco_inference
    from qlora_dist.evaluate import generate

    assert guanaco_conversation(["Hi"], []) == guanaco_inference("Hi")
    seen: list[str] = []
    real = generate.generate_texts

    def recording(model, tokenizer, texts, *args, **kwargs):
        seen.extend(texts)
        return real(model, tokenizer, texts, *args, **kwargs)

    monkeypatch.setattr(generate, "generate_texts", recording)
    model, tok = generate.load_for_inference(str(tiny_model_dir))
    questions = [generate.Question(1, ["Add 2 and 3.", "Now double it."]), generate.Question(2, ["Say hi."])]
    answers = generate.answer_questions(model, tok, questions, max_new_tokens=3)
    assert [len(a) for a in answers] == [2, 1]
    assert seen[:2] == [guanaco_inference("Add 2 and 3."), guanaco_inference("Say hi.")]
    assert seen[2] == guanaco_conversation(["Add 2 and 3.", "Now double it."], [answers[0][0]], end=tok.eos_token)
    assert seen[2].startswith(seen[0]) and seen[2].endswith("### Human: Now double it. ### Assistant:")
    rows = generate.answer_records("llm_judge", questions, answers, "m")
    _check_judge_rows(rows, [1, 2], [2, 1])
