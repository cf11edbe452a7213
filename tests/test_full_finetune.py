"""Full fine-tuning (train.method=full, issue 26) on the DeepSpeed engine, 2 CPU ranks.

One torchrun launch (tests/workers/full_cases.py) trains every case in turn; the checks read what it wrote:
  zero3          bf16 weights, ZeRO-3, 4 steps, a checkpoint every 2 (the uninterrupted run)
  zero3-resumed  the same run continued from a copy of zero3's checkpoint-2 (as after a kill at step 2)
  split4/split1  fp32, ZeRO-3, 3 steps: micro batch 4 x accumulation 1 against 1 x 4 (2 ranks, global batch 8)
  zero2          bf16 weights, ZeRO-2, 4 steps, checkpoint.keep_best (a validation split of 8 rows)
and one plain process (one rank) the memory case: random:smoke (17.7M weights), ZeRO-3, a training step's
measured peak against the planner's figure; and `int8`: LoRA on an LLM.int8 base (quantization.bits=8), ZeRO-2. On one rank the peak is the same every run (to a few hundred
bytes); on two it moved by up to 90 MB with how the ranks' gradient reductions interleaved under load.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, read_metrics, run_cli, run_torchrun

FULL = ["model.path=tiny-llama", "train.method=full", "optim.lr=1e-3", "train.global_batch_size=8",
        "data.num_train=64", "data.num_eval=8", "eval.at_end=false", "train.seed=7", "checkpoint.keep_last=0",
        "dist.ds_config=zero3", "train.micro_batch_size=4"]
BF16_4_STEPS = "model.compute_dtype=bfloat16,train.max_steps=4,train.save_steps=2"
SPLIT = "model.compute_dtype=float32,train.max_steps=3,train.save_steps=3,model.gradient_checkpointing=false"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    cases = [f"zero3:{BF16_4_STEPS}", f"zero3-resumed:{BF16_4_STEPS},copy={out / 'zero3' / 'checkpoint-2'}",
             f"split4:{SPLIT}", f"split1:{SPLIT},train.micro_batch_size=1",
             # ZeRO-2 also under checkpoint.keep_best: each checkpoint holds model/ beside the engine state
             f"zero2:{BF16_4_STEPS},dist.ds_config=zero2,checkpoint.keep_best=true,checkpoint.keep_last=1,"
             "data.eval_size=8"]
    run_torchrun(2, str(out), *cases, "--", *FULL, script=str(REPO / "tests" / "workers" / "full_cases.py"),
                 timeout=400)
    return out


@pytest.fixture(scope="module")
def one_rank_memory(tmp_path_factory):
    out = tmp_path_factory.mktemp("full-memory")
    int8 = ("train.method=qlora,quantization.bits=8,lora.r=8,lora.alpha=16,optim.lr=3e-3,dist.ds_config=zero2,"
            "train.max_steps=3,train.save_steps=3,model.compute_dtype=bfloat16")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "full_cases.py"), str(out),
                           "memory:model.path=random:smoke,model.compute_dtype=bfloat16,train.max_steps=2",
                           f"int8:{int8}", "--", *FULL], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _losses(folder) -> list[float]:
    return [m["loss"] for m in read_metrics(folder) if "loss" in m]


def _model_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((folder / "model" / "model.safetensors.index.json").read_text())
    return {k: v for f in sorted(set(index["weight_map"].values())) for k, v in load_file(str(folder / "model" / f)).items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zero3", "zero2"])
def test_loss_falls_and_every_weight_is_trained(runs, case, tiny_model_dir):
    from safetensors.torch import load_file

    losses = _losses(runs / case)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, losses
    start, trained = load_file(str(tiny_model_dir / "model.safetensors")), _model_tensors(runs / case)
    assert trained.keys() == start.keys()  # every tensor of the base, none added
    unchanged = [k for k in start if torch.equal(start[k].to(trained[k].dtype), trained[k])]
    assert not unchanged and all(t.dtype == torch.bfloat16 for t in trained.values())
    assert not (runs / case / "checkpoint-4" / "adapter_model").exists()


@pytest.mark.slow
def test_resume_from_step_2_equals_the_uninterrupted_run_bitwise(runs):
    full, resumed = _model_tensors(runs / "zero3"), _model_tensors(runs / "zero3-resumed")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    assert _losses(runs / "zero3-resumed") == _losses(runs / "zero3")[2:]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zero3", "zero2"])
def test_model_folder_loads_with_from_pretrained_and_gives_the_trained_logits(runs, case):
    from transformers import AutoModelForCausalLM

    index = json.loads((runs / case / "model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 5  # embeddings, 2 layers, norm, lm_head: a file each
    saved = torch.load(runs / case / "trained_logits.pt")
    model = AutoModelForCausalLM.from_pretrained(runs / case / "model", dtype=torch.bfloat16).eval()
    batch, mask = saved["batch"], saved["batch"]["attention_mask"].bool()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    gap = (logits - saved["logits"])[mask].abs().max().item()
    print(f"{case}: from_pretrained logits vs the 2-rank engine's: max difference {gap:.3g}")
    assert gap == 0.0


@pytest.mark.slow
def test_keep_best_keeps_a_model_folder_in_the_checkpoints_it_keeps(runs):
    """checkpoint.keep_best under train.method=full: the best checkpoint and the newest each hold model/; the
    newest's is the run's final model/ bit for bit."""
    from qlora_dist.train.checkpoint import read_progress

    case = runs / "zero2"
    kept = sorted(case.glob("checkpoint-*"))
    best = read_progress(kept[-1]).best_step
    assert best is not None and case / f"checkpoint-{best}" in kept
    assert all((c / "model" / "model.safetensors.index.json").is_file() for c in kept)
    final, newest = _model_tensors(case), _model_tensors(kept[-1])
    assert final.keys() == newest.keys() and all(torch.equal(final[k], newest[k]) for k in final)
    proc = run_cli("verify", str(case), check=False)  # every kept checkpoint whole, model/ files included
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_a_micro_batch_split_changes_nothing_beyond_fp32_rounding(runs):
    a, b = _model_tensors(runs / "split4"), _model_tensors(runs / "split1")
    diff = torch.cat([(a[k].double() - b[k].double()).flatten() for k in a]).norm()
    relative = (diff / torch.cat([a[k].double().flatten() for k in a]).norm()).item()
    la, lb = _losses(runs / "split4"), _losses(runs / "split1")
    print(f"4x1 vs 1x4: weights differ by {relative:.3g} (relative), losses {la} vs {lb}")
    assert all(t.dtype == torch.float32 for t in a.values())
    assert relative < 1e-5 and max(abs(x - y) / x for x, y in zip(la, lb)) < 1e-5


@pytest.mark.slow
def test_the_planned_peak_is_within_10_percent_of_the_cpu_allocators(one_rank_memory):
    rows = json.loads((one_rank_memory / "memory" / "memory.json").read_text())
    assert len(rows) == 1
    for row in rows:
        print(f"rank {row['rank']}: planned {row['planned'] / 1e6:.1f} MB, measured peak {row['measured_peak'] / 1e6:.1f} MB")
        assert abs(row["planned"] - row["measured_peak"]) <= 0.10 * row["measured_peak"], row


@pytest.mark.slow
def test_resuming_on_another_world_size_is_refused_before_loading(runs, tmp_path):
    shutil.copytree(runs / "zero3", tmp_path / "run", ignore=shutil.ignore_patterns(".lock*"))
    keys = [*FULL, *BF16_4_STEPS.split(","), "train.max_steps=6", f"train.output_dir={tmp_path / 'run'}"]
    proc = run_cli("train", *keys, check=False)  # one rank
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("checkpoint-4 was saved by 2 rank(s) under ZeRO-3; this run has 1 under ZeRO-3: full fine-tuning "
            "(train.method=full) resumes on the world size and ZeRO stage it was saved with only") in proc.stderr
    assert "loading tiny-llama" not in proc.stderr


@pytest.mark.slow
def test_verify_checks_the_model_folder(runs, capsys):
    from qlora_dist import cli

    code = cli.main(["verify", str(runs / "zero3")])
    out = capsys.readouterr().out
    assert "model: ok" in out and "checkpoint-4: ok" in out and not code


@pytest.mark.slow
def test_generate_merge_and_init_adapter_on_the_model_folder(runs, tmp_path, capsys):
    """generate loads it in 16 bit (its own weights); merge and train.init_adapter say it is no adapter."""
    from qlora_dist import cli
    from qlora_dist.config import load_config
    from qlora_dist.evaluate.generate import load_for_inference
    from qlora_dist.model import init_adapter

    folder = runs / "zero3" / "model"
    model, _ = load_for_inference(str(folder), compute_dtype="bfloat16")
    saved = _model_tensors(runs / "zero3")
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters())  # not quantized: as trained
    why = (f"is a fully fine-tuned model (train.method=full), not a PEFT adapter: there is no adapter to apply or "
           f"merge; use the folder itself as the model (model.path={folder} or --base {folder})")
    assert cli.main(["merge", "--base", "tiny-llama", "--adapter", str(folder), "--out", str(tmp_path / "m")]) == 2
    assert f"--adapter: {folder} {why}" in capsys.readouterr().err
    cfg = load_config(overrides=["model.path=tiny-llama", f"train.init_adapter={folder}"])
    assert init_adapter.problems(cfg) == [f"train.init_adapter: {folder} {why}"]


def test_planner_counts_full_fine_tunings_bytes_per_weight_per_zero_stage():
    """bf16 weights (2 bytes), fp32 gradients (4), fp32 masters (4), fp32 Adam moments (8): 18 bytes a weight
    on one rank; ZeRO-2 splits all but the weights, ZeRO-3 all of them, over the ranks."""
    from qlora_dist import memory

    shape = memory.Shape.llama("7b")
    weights = memory.full_numels(shape)
    for stage, ranks in ((2, 1), (2, 8), (3, 8)):
        s = memory.Setup(shape, world_size=ranks, zero_stage=stage, bits=16, full=True, optimizer="adamw_torch",
                         on_gpu=True, fused_loss=False, lora_dropout=False)
        items = memory.make_plan(s).items
        whole = 2 * sum(weights) if stage == 2 else 2 * sum(-(-n // ranks) for n in weights)
        shard = -(-sum(weights) // (2 * ranks)) * 2 if stage == 2 else sum(-(-n // ranks) for n in weights)
        assert items["weights_16bit"] == whole and "lora_weights" not in items and "base_nf4" not in items
        assert (items["grads_fp32"], items["master_weights_fp32"], items["optimizer_states"]) == (4 * shard, 4 * shard, 8 * shard)
    assert sum(weights) == shape.parameters() == 6_738_415_616


def test_a_full_run_that_cannot_fit_is_refused_before_loading(capsys, tmp_path):
    from qlora_dist import cli

    keys = ["model.path=random:7b", "train.method=full", "optim.name=adamw_torch", "train.max_memory_per_gpu=80GB",
            f"train.output_dir={tmp_path}"]
    assert cli.main(["check", *keys, "--world-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "train.max_memory_per_gpu: 80GB cannot hold this run (planned 1" in err and "full fine-tuning" in err
    assert cli.main(["check", *keys, "dist.ds_config=zero3", "train.micro_batch_size=2", "--world-size", "8"]) == 0


@pytest.mark.slow
def test_lora_on_an_int8_base_trains_under_zero2_and_generate_loads_it_so(one_rank_memory, tiny_model_dir, capsys):
    import bitsandbytes as bnb

    from qlora_dist import cli
    from qlora_dist.evaluate.generate import load_for_inference

    run = one_rank_memory / "int8"
    losses = _losses(run)
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert json.loads((run / "adapter_model" / "qlora_dist.json").read_text())["bits"] == 8
    model, _ = load_for_inference("tiny-llama", str(run / "adapter_model"))
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) == 14  # 7 a layer, 2 layers
    assert cli.main(["merge", "--base", "tiny-llama", "--adapter", str(run / "adapter_model"),
                     "--out", str(one_rank_memory / "merged")]) == 2
    assert "was trained on an 8-bit (LLM.int8) base, which merge does not dequantize yet" in capsys.readouterr().err


def test_int8_is_refused_before_loading_under_the_layerwise_zero3_loader(capsys, tmp_path):
    from qlora_dist import cli

    assert cli.main(["check", "model.path=tiny-llama", "quantization.bits=8", "dist.ds_config=zero3",
                     f"train.output_dir={tmp_path}"]) == 2
    assert ("quantization.bits: 8 (LLM.int8) loads through transformers' from_pretrained, but "
            "dist.ds_config=zero3 (ZeRO-3) uses the layer-wise loader, which quantizes to 4 bit only") in capsys.readouterr().err
    assert cli.main(["check", "model.path=tiny-llama", "quantization.bits=8", f"train.output_dir={tmp_path}"]) == 0
