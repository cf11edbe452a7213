"""Every error before loading: bad inputs end `train` with exit 2 and one line per problem, before any
tensor of the model is read or the model is built; `check` prints the plan of a 65B run in seconds.

The CLI runs in this process (`qlora_dist.cli.main`), with every way of reading model weights replaced by a
trap: a case that got past the preflight would trip it and fail the test with the trap's name.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TINY, alpaca_file
from qlora_dist.cli import main

class LoadTrap(AssertionError):
    pass


@pytest.fixture
def trapped(monkeypatch):
    """Every function through which model weights are read or a model is built raises LoadTrap."""
    import safetensors
    import torch
    import transformers

    from qlora_dist.model import base, loader
    from qlora_dist.train import trainer

    # Every module of the package imported before the trap is set: one first imported during a test would
    # bind the trap by `from ... import name` and keep it after monkeypatch undoes the attributes (it did:
    # later tests in the same process then failed "model weights were reached through ...").
    import pkgutil

    import qlora_dist
    for module in pkgutil.walk_packages(qlora_dist.__path__, "qlora_dist."):
        if module.name != "qlora_dist.__main__":
            importlib.import_module(module.name)
    import transformers.modeling_utils as modeling_utils  # lazily imported by transformers; binds safe_open

    def trap(name):
        def raise_(*args, **kwargs):
            raise LoadTrap(f"model weights were reached through {name} before the preflight stopped the run")
        return raise_
    for owner, name in [(base, "build_model"), (base, "load_base"), (base, "load_base_layerwise"),
                        (trainer, "build_model"), (loader, "load_layerwise"), (safetensors, "safe_open"),
                        (modeling_utils, "safe_open"),
                        (torch, "load"), (transformers.AutoModelForCausalLM, "from_pretrained")]:
        monkeypatch.setattr(owner, name, trap(f"{getattr(owner, '__name__', owner)}.{name}"))


def run_main(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.startswith("qlora-dist: error: ")]


def write_safetensors_header(path: Path, tensors: dict[str, tuple[list[int], str]], truncate_by: int = 0) -> None:
    """A safetensors file whose header describes `tensors` (name -> (shape, dtype)); the data is a hole
    (a sparse file), so a 65B folder costs no disk."""
    sizes = {"BF16": 2, "F32": 4, "U8": 1}
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        n = sizes[dtype] * int(__import__("math").prod(shape))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset - truncate_by)


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    shutil.copytree(tiny_model_dir, out)
    return out


def broken_model(tmp_path: Path, model_copy: Path, how: str) -> Path:
    out = tmp_path / f"model-{how}"
    shutil.copytree(model_copy, out)
    if how == "config":
        (out / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,\n  "num_hidden_layers": 2,,}')
    elif how == "truncated":
        weights = out / "model.safetensors"
        with weights.open("r+b") as f:
            f.truncate(weights.stat().st_size - 1000)
    elif how == "no-tokenizer":
        (out / "tokenizer.json").unlink()
    return out


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write: chmod for a normal user; as root (CI), the immutable flag or a
    read-only tmpfs mount, whichever this machine allows."""
    path = tmp_path / "readonly"
    path.mkdir()
    path.chmod(0o555)
    undo = None
    if os.access(path, os.W_OK):
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
            undo = ["chattr", "-i", str(path)]
        elif subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                            capture_output=True).returncode == 0:
            undo = ["umount", str(path)]
    if os.access(path, os.W_OK):
        pytest.skip("cannot make a read-only folder on this machine (root without chattr or mount)")
    yield path
    if undo:
        subprocess.run(undo, check=True)
    path.chmod(0o755)


def bad_inputs(tmp_path: Path, model_copy: Path, read_only_dir: Path) -> dict[str, tuple[list[str], int]]:
    """name -> (train arguments, number of problems it must report)."""
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "garbage.jsonl").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "zero.parquet").write_bytes(b"")
    (tmp_path / "few.jsonl").write_text("".join(json.dumps({"input": f"q{i}", "output": "a"}) + "\n" for i in range(3)))
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    (tmp_path / "yaml-folder.yaml").mkdir()
    (tmp_path / "dup.yaml").write_text("optim:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    (tmp_path / "mmlu.json").write_text("{not json\n")
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2},\n "train_batch_size": "auto",,}')
    out = [f"train.output_dir={tmp_path / 'out'}"]
    data = lambda name: [f"data.dataset={tmp_path / name}"]  # noqa: E731
    return {
        "missing dataset": ([*TINY, *out, f"data.dataset={tmp_path / 'nope.jsonl'}"], 1),
        "empty dataset": ([*TINY, *out, *data("empty.jsonl")], 1),
        "binary-garbage dataset": ([*TINY, *out, *data("garbage.jsonl")], 1),
        "0-byte parquet": ([*TINY, *out, *data("zero.parquet")], 1),
        "too few rows for a global batch": ([*TINY, *out, *data("few.jsonl")], 1),
        "read-only output folder": ([*TINY, f"train.output_dir={read_only_dir / 'run'}"], 1),
        "output folder is a file": ([*TINY, f"train.output_dir={tmp_path / 'a-file'}"], 1),
        "malformed config.json": ([*TINY, *out, f"model.path={broken_model(tmp_path, model_copy, 'config')}"], 1),
        "truncated weight file": ([*TINY, *out, f"model.path={broken_model(tmp_path, model_copy, 'truncated')}"], 1),
        "no tokenizer files": ([*TINY, *out, f"model.path={broken_model(tmp_path, model_copy, 'no-tokenizer')}"], 1),
        "missing model folder": ([*TINY, *out, f"model.path={tmp_path / 'no-model'}"], 1),
        "optim.lr=nan": ([*TINY, *out, "optim.lr=nan"], 1),
        "binary YAML": ([str(tmp_path / "binary.yaml"), *TINY, *out], 1),
        "YAML that is a folder": ([str(tmp_path / "yaml-folder.yaml"), *TINY, *out], 1),
        "duplicate YAML key": ([str(tmp_path / "dup.yaml"), *TINY, *out], 1),
        "bad MMLU file": ([*TINY, *out, f"eval.mmlu_data={tmp_path / 'mmlu.json'}"], 1),
        "starting adapter missing": ([*TINY, *out, f"train.init_adapter={tmp_path / 'no-adapter'}"], 1),
        "old key train.resume_from": ([*TINY, *out, f"train.resume_from={tmp_path}"], 1),
        "unknown DeepSpeed config": ([*TINY, *out, "dist.ds_config=zero9"], 1),
        "DeepSpeed JSON with a syntax error": ([*TINY, *out, f"dist.ds_config={tmp_path / 'ds.json'}"], 1),
        "memory cap too small": ([*TINY, *out, "train.max_memory_per_gpu=1MB"], 1),
        "three problems at once": ([*TINY, "optim.lr=nan", f"train.output_dir={tmp_path / 'a-file'}",
                                    f"data.dataset={tmp_path / 'nope.jsonl'}"], 3),
    }


def test_bad_inputs_end_train_with_exit_2_before_the_model_is_read(tmp_path, capsys, trapped, model_copy,
                                                                  read_only_dir):
    cases = bad_inputs(tmp_path, model_copy, read_only_dir)
    assert len(cases) >= 15
    report = []
    for name, (args, expected) in cases.items():
        start = time.perf_counter()
        code, lines = run_main(capsys, "train", *args)
        report.append(f"{name:<36} exit {code}  {time.perf_counter() - start:5.2f} s  {lines}")
        assert code == 2 and len(lines) == expected, f"{name}: exit {code}, {lines}"
    print("\n".join(report))
    assert not (tmp_path / "out").exists()  # nothing written for a run that did not start


def test_each_problem_names_its_file_or_key(tmp_path, capsys, trapped, model_copy, read_only_dir):
    cases = bad_inputs(tmp_path, model_copy, read_only_dir)
    names = {"missing dataset": "nope.jsonl", "0-byte parquet": "zero.parquet", "truncated weight file":
             "model.safetensors", "malformed config.json": "config.json:2", "optim.lr=nan": "optim.lr",
             "duplicate YAML key": "dup.yaml:3", "read-only output folder": "not writable",
             "output folder is a file": "a-file is a file", "old key train.resume_from": "train.init_adapter",
             "too few rows for a global batch": "fewer than one global batch", "binary YAML": "binary.yaml"}
    for name, needle in names.items():
        _, lines = run_main(capsys, "train", *cases[name][0])
        assert needle in lines[0], f"{name}: {lines}"


def test_a_second_run_into_a_folder_being_written_stops_at_once(tmp_path, capsys, trapped):
    import socket

    from qlora_dist.paths import RunPaths
    from qlora_dist.writer_lock import WriterLock, live_holder

    out = tmp_path / "out"
    first = WriterLock(RunPaths(out), log=lambda m: None)
    first.acquire()  # the first run, still writing
    try:
        code, lines = run_main(capsys, "train", *TINY, f"train.output_dir={out}")
        assert code == 2 and len(lines) == 1 and "is being written by another run" in lines[0]
        assert f"pid {os.getpid()} on {socket.gethostname()}" in lines[0]  # the holder, named
        assert main(["check", *TINY, f"train.output_dir={out}"]) == 0  # `check` only warns
        assert "warning: train.output_dir" in capsys.readouterr().out
    finally:
        first.release()
    assert live_holder(RunPaths(out)) == (False, None)  # released with its holder


@pytest.mark.parametrize("args", [["--world-size", "0"], ["--world-size", "-2"], ["--gpu-memory", "12XB"]])
@pytest.mark.parametrize("command", ["plan", "check"])
def test_plan_and_check_refuse_bad_world_sizes_and_memory(capsys, command, args):
    code, lines = run_main(capsys, command, "--preset", "7b-all", *args)
    assert code == 2 and len(lines) == 1 and lines[0].split(": ")[2] in ("--world-size", "--gpu-memory"), lines


def test_init_adapter_must_agree_with_the_lora_keys_the_user_set(tmp_path, capsys, trapped):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}))
    write_safetensors_header(adapter / "adapter_model.safetensors", {"x": ([8, 64], "F32")})
    args = [*TINY, f"train.output_dir={tmp_path / 'out'}", f"train.init_adapter={adapter}", "lora.target_modules=all-linear"]
    code, lines = run_main(capsys, "train", *[a for a in args if not a.startswith("lora.r=")], "lora.r=16")
    assert code == 2 and len(lines) == 2, lines  # r and target_modules; alpha and dropout agree
    assert lines[0].startswith("qlora-dist: error: lora.r: you set 16") and "lora.target_modules" in lines[1]
    # Keys not set take the adapter's values (what the saved config then says).
    from qlora_dist.config import load_config
    from qlora_dist.model import init_adapter

    cfg = init_adapter.adopt(load_config(overrides=[f"train.init_adapter={adapter}", "lora.alpha=16"]))
    assert (cfg.lora.r, cfg.lora.target_modules, cfg.lora.alpha) == (8, ["q_proj", "v_proj"], 16)


def test_a_dora_adapter_sets_the_variant_and_a_conflicting_key_is_refused(tmp_path, capsys, trapped):
    """The variant and the scaling are read from the adapter's own config (peft's use_dora, use_rslora);
    an adapter saved before those fields existed is plain LoRA, as peft builds it."""
    from qlora_dist.config import load_config
    from qlora_dist.model import init_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["q_proj"],
              "use_dora": True, "use_rslora": True}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    write_safetensors_header(adapter / "adapter_model.safetensors", {"x": ([8, 64], "F32")})
    args = [*TINY, f"train.output_dir={tmp_path / 'out'}", f"train.init_adapter={adapter}"]
    code, lines = run_main(capsys, "check", *args, "lora.variant=lora", "lora.rslora=false")
    assert code == 2 and len(lines) == 2, lines
    assert "lora.variant: you set 'lora'" in lines[0] and "use_dora=True (lora.variant='dora')" in lines[0]
    assert "lora.rslora: you set False" in lines[1]
    cfg = init_adapter.adopt(load_config(overrides=args))
    assert (cfg.lora.variant, cfg.lora.rslora) == ("dora", True)
    del config["use_dora"], config["use_rslora"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, lines = run_main(capsys, "check", *args, "lora.variant=dora")
    assert code == 2 and "lora.variant: you set 'dora'" in lines[0] and "use_dora=False" in lines[0], lines


def test_check_prints_the_plan_of_a_65b_run_in_seconds(tmp_path, capsys):
    """A real-looking 65B folder: LLaMA-65B's config.json, a tokenizer, two safetensors shards whose
    headers describe 130 GB (sparse files: no disk used)."""
    from qlora_dist.model.builtin import resolve_model_path

    folder = tmp_path / "llama-65b"
    folder.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192,
              "intermediate_size": 22016, "num_hidden_layers": 80, "num_attention_heads": 64, "vocab_size": 32000}
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(resolve_model_path("tiny-llama") / "tokenizer.json", folder)
    shards = {"model-00001-of-00002.safetensors": {"model.embed_tokens.weight": ([32000, 8192], "BF16"),
                                                   "layers.0-39": ([40 * 808_000_000], "BF16")},
              "model-00002-of-00002.safetensors": {"layers.40-79": ([40 * 808_000_000], "BF16"),
                                                   "lm_head.weight": ([32000, 8192], "BF16")}}
    for name, tensors in shards.items():
        write_safetensors_header(folder / name, tensors)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {t: name for name, tensors in shards.items() for t in tensors}}))
    data = alpaca_file(tmp_path / "alpaca.jsonl", 100)
    start = time.perf_counter()
    code = main(["check", "--preset", "65b-all", f"model.path={folder}", f"data.dataset={data}",
                 f"train.output_dir={tmp_path / 'run'}", "dist.ds_config=zero3", "--world-size", "16",
                 "--gpu-memory", "48GB"])
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    with capsys.disabled():
        print(f"\n{out}\ncheck took {seconds:.2f} s")
    assert code == 0 and "preflight: no problems found" in out and seconds < 10
    assert "cap 48.00 GB per GPU: fits" in out and "ZeRO-3, 16 rank(s)" in out
    assert "format alpaca, 100 records" in out and "micro batch 1 x accumulation 4 x 16 rank(s)" in out
    # The same folder with one shard cut short is found, still without reading a tensor.
    write_safetensors_header(folder / "model-00002-of-00002.safetensors", shards["model-00002-of-00002.safetensors"],
                             truncate_by=4096)
    code = main(["check", "--preset", "65b-all", f"model.path={folder}", f"data.dataset={data}",
                 f"train.output_dir={tmp_path / 'run'}", "--world-size", "16", "--gpu-memory", "48GB"])
    err = capsys.readouterr().err
    assert code == 2 and "model-00002-of-00002.safetensors" in err and "truncated" in err
