"""What the commands check before a weight is read (issue 23, classes 1, 2 and 5): the outputs they will
write (atomic.check_output), the base an adapter was trained on (adapter_settings.base_problems), and the
ranges of their options (config.Range, shared with the config keys). Each bad input is exit 2, one line
naming its option, in the first seconds, with nothing new on disk."""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from conftest import TEST_DATA, TINY, alpaca_file

QUESTIONS = TEST_DATA / "vicuna_bench" / "fastchat_llm_judge" / "question.jsonl"
MMLU = TEST_DATA / "mmlu" / "zero_shot_mmlu_val.json"


def _fake_adapter(out, base_dir, base_name: str, r: int = 8, identity: bool = True, wrong_in: bool = False):
    """A PEFT LoRA adapter folder for `base_dir`'s linear layers (shapes from its safetensors header; no
    model is built), with qlora_dist.json recording `base_name`; identity=False: as saved before the base's
    model type and config hash were recorded."""
    from safetensors.torch import save_file

    from qlora_dist.model import adapter_settings, folder

    tensors = {}
    for name, shape in folder.weight_shapes(base_dir).items():
        if name.endswith("_proj.weight"):
            module = "base_model.model." + name.removesuffix(".weight")
            tensors[f"{module}.lora_A.weight"] = torch.zeros(r, shape[1] + (64 if wrong_in else 0))
            tensors[f"{module}.lora_B.weight"] = torch.zeros(shape[0], r)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    targets = sorted({k.split(".")[-3] for k in tensors})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.1,  # as conftest.TINY
        "target_modules": targets, "base_model_name_or_path": str(base_dir), "bias": "none"}))
    adapter_settings.write(out, base_model=base_name, bits=4, quant_type="nf4", double_quant=True,
                           compute_dtype="float32")
    if not identity:
        saved = json.loads((out / adapter_settings.FILE).read_text())
        for key in ("base_model_type", "base_config_sha256"):
            saved.pop(key)
        (out / adapter_settings.FILE).write_text(json.dumps(saved))
    return out


def _refused(capsys, argv: list[str], *needles: str, bound_s: float = 15.0) -> str:
    """main(argv) exits 2 within bound_s with one error line per problem, containing every needle. (Each
    takes at most a second or two on an idle machine; the bound leaves room for a loaded one.)"""
    from qlora_dist.cli import main

    capsys.readouterr()
    start = time.perf_counter()
    code = main(argv)
    took = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("qlora-dist: error:")]
    assert code == 2 and lines, err
    assert all(n in err for n in needles), err
    assert "Traceback" not in err and took < bound_s, (took, err)
    return "\n".join(lines)


def test_outputs_are_checked_before_the_work(tmp_path, tiny_model_dir, capsys):
    from qlora_dist import atomic
    from qlora_dist.errors import RunFault
    from qlora_dist.evaluate.generate import write_jsonl

    a_file = tmp_path / "ofile"
    a_file.write_text("mine\n")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("keep")
    adapter = _fake_adapter(tmp_path / "adapter", tiny_model_dir, "tiny-llama")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    gen = ["generate", "--base", "tiny-llama", "--prompts", str(QUESTIONS), "--max-new-tokens", "2", "--out"]
    _refused(capsys, [*gen, str(a_file / "answers.jsonl")], f"--out: {a_file} (on the way to", "is a file")
    _refused(capsys, [*gen, str(full)], f"--out: {full} is a folder")
    merge = ["merge", "--base", "tiny-llama", "--adapter", str(adapter), "--out"]
    _refused(capsys, [*merge, str(full)], f"--out: {full} exists and is not empty")
    _refused(capsys, [*merge, str(a_file)], f"--out: {a_file} is a file, not a folder")
    # prepare-model used to remove a non-empty folder that held no model: refused now, its files kept
    _refused(capsys, ["prepare-model", "tiny-llama", "--out", str(full)], f"--out: {full} exists and is not empty")
    _refused(capsys, ["prepare-model", "tiny-llama", "--out", str(a_file / "m")], "is a file, not a folder")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before and (full / "keep.txt").read_text() == "keep"
    assert a_file.read_text() == "mine\n"
    # A write that fails late anyway names the path and leaves no hidden temporary file behind.
    with pytest.raises(RunFault, match=f"--out: could not write {full}"):
        write_jsonl(full, [{"a": 1}])
    with pytest.raises(IsADirectoryError):
        atomic.write_text(full, "x")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert atomic.output_problems(tmp_path / "new" / "deeper" / "a.jsonl", "--out") == []


def test_an_adapter_is_refused_on_a_base_it_was_not_trained_on(tmp_path, tiny_model_dir, capsys):
    from qlora_dist.config import load_config
    from qlora_dist.model import adapter_settings, init_adapter
    from qlora_dist.model.base import adapter_problems
    from qlora_dist.model.builtin import resolve_model_path

    resolve_model_path("tiny:qwen2")  # same layer shapes as the tiny LLaMA: only what is recorded tells them apart
    new = _fake_adapter(tmp_path / "new", tiny_model_dir, "tiny-llama")
    old = _fake_adapter(tmp_path / "old", tiny_model_dir, str(tiny_model_dir), identity=False)
    saved = json.loads((new / adapter_settings.FILE).read_text())
    assert saved["base_model_type"] == "llama" and len(saved["base_config_sha256"]) == 64
    other = "was trained on a 'llama' base"
    for adapter in (new, old):
        _refused(capsys, ["eval", "mmlu", "--base", "tiny:qwen2", "--adapter", str(adapter), "--data", str(MMLU),
                          "--max-questions", "4"], f"--adapter: {adapter} {other}", "'qwen2' model",
                 "--allow-base-mismatch")
    _refused(capsys, ["merge", "--base", "tiny:qwen2", "--adapter", str(new), "--out", str(tmp_path / "m")], other)
    _refused(capsys, ["generate", "--base", "tiny:qwen2", "--adapter", str(new), "--prompt", "hi"], other)
    assert not (tmp_path / "m").exists()
    # Shapes (a PEFT adapter of another tool records nothing else) and the config's hash.
    wide = _fake_adapter(tmp_path / "wide", tiny_model_dir, "tiny-llama", wrong_in=True)
    assert "in features, the base's" in adapter_problems(wide, "tiny-llama")[0]
    hashed = dict(saved, base_config_sha256="0" * 64)
    (new / adapter_settings.FILE).write_text(json.dumps(hashed))
    assert "config.json differs" in adapter_problems(new, "tiny-llama")[0]
    assert adapter_problems(old, "tiny-llama") == [] and adapter_problems(new, "tiny:qwen2", allow_mismatch=True) == []
    # train.init_adapter: the base and the quantization, with the config key as the override.
    start = [*TINY, f"train.init_adapter={old}"]
    for extra, needle in ((["model.path=tiny:qwen2"], "'qwen2' model"), (["quantization.quant_type=fp4"],
                          "quant_type='nf4'")):
        problems = init_adapter.problems(load_config(overrides=[*start, *extra]))
        assert len(problems) == 1 and needle in problems[0] and "model.allow_base_mismatch=true" in problems[0]
    assert init_adapter.problems(load_config(overrides=[*start, "model.path=tiny:qwen2",
                                                        "model.allow_base_mismatch=true"])) == []
    # Resume: the checkpoint's adapter against model.path as it is now (same path, another config.json).
    from qlora_dist.errors import ConfigError
    from qlora_dist.paths import RunPaths
    from qlora_dist.train import checkpoint

    cfg = load_config(overrides=[*TINY, f"train.output_dir={tmp_path / 'run'}"])
    ckpt = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(new, ckpt / "adapter_model")  # its recorded config hash is not tiny-llama's
    (ckpt / "config.yaml").write_text(cfg.to_yaml())
    (ckpt / "progress.json").write_text(json.dumps({"step": 2, "samples_seen": 16, "epoch": 0.1, "seed": 7,
                                                    "world_size": 1, "global_batch_size": 8, "zero_stage": 2}))
    with pytest.raises(ConfigError, match=r"train.output_dir: .*checkpoint-2/adapter_model was trained on a base "
                                          r"whose config.json differs .* model.allow_base_mismatch=true"):
        checkpoint._check_resumable(RunPaths.of(cfg), ckpt, cfg)
    cfg.model.allow_base_mismatch = True
    checkpoint._check_resumable(RunPaths.of(cfg), ckpt, cfg)


def test_option_ranges_are_checked_on_the_command_line_and_in_the_config(tmp_path, tiny_model_dir, capsys):
    from qlora_dist.config import SEED_MAX, TOP_P, Range, parse_config

    assert Range(0, 1, low_open=True).problem("x", 1) is None and TOP_P.problem("--top-p", 0) is not None
    gen = ["generate", "--base", "tiny-llama", "--prompt", "hello"]
    text = _refused(capsys, [*gen, "--max-new-tokens", "0", "--temperature", "-1", "--top-p", "2",
                             "--seed", str(2**70)], "--max-new-tokens: must be > 0 (got 0)",
                    "--temperature: must be >= 0 (got -1.0)", "--top-p: must be in (0, 1] (got 2.0)",
                    f"--seed: must be an integer in [0, {SEED_MAX}]")
    assert len(text.splitlines()) == 4
    _refused(capsys, [*gen, "--temperature", "nan"], "--temperature: must be a finite number >= 0 (got nan)")
    _refused(capsys, [*gen, "--max-new-tokens", "100000000"], "--max-new-tokens: 100000000 new tokens",
             "512 positions", "at most 4")
    text = _refused(capsys, ["eval", "mmlu", "--base", "tiny-llama", "--data", str(MMLU), "--batch-size", "0",
                             "--max-questions", "4"], "--batch-size: must be > 0 (got 0)")
    assert "--max-questions" not in text and len(text.splitlines()) == 1
    # The config: the same checkers, a 64-bit seed caught before anything loads, and no second line
    # computed from a value already refused.
    _, problems = parse_config(overrides=["train.seed=99999999999999999999999"])
    assert problems == [f"train.seed: must be an integer in [0, {SEED_MAX}] (got 99999999999999999999999)"]
    alpaca = alpaca_file(tmp_path / "alpaca.json", 100)  # Alpaca-schema rows (the real ones are not kept)
    out = f"train.output_dir={tmp_path / 'run'}"
    for bad, needle in ((f"data.dataset=[{{path: {alpaca}, weight: -1}}]", "weight: must be a number > 0"),
                        (f"data.dataset=[{{path: {alpaca}, weight: abc}}]", "weight: must be a finite number > 0"),
                        (f"data.max_examples=-1", "data.max_examples: must be >= 0 (got -1)")):
        args = [f"data.dataset={alpaca}", bad] if "max_examples" in bad else [bad]
        text = _refused(capsys, ["check", *TINY, out, *args], needle, bound_s=30)
        assert len(text.splitlines()) == 1, text
    assert not (tmp_path / "run").exists()
