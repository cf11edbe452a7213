"""Sequence parallelism (dist.sequence_parallel, DeepSpeed's Ulysses): one row split across the ranks of a
group gives the update of one rank holding it whole; its refusals come before loading; its checkpoints
resume under another dist.sequence_parallel.

Real rows of variable length (the self-instruct seed tasks, up to 512 tokens here), the tiny LLaMA (4
heads, 2 KV heads) in fp32, LoRA dropout off, 4 steps. Three launches for the whole file (tests/workers/
train_cases.py): 1 rank (the reference), 2 ranks (N=2 under ZeRO-2 and ZeRO-3; N=1 over 2 ranks;
resumes across N and within it), 4 ranks (2 groups x N=2)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TEST_DATA, TINY, load_adapter_tensors, read_metrics, run_torchrun
from test_preflight import run_main

ROWS = TEST_DATA / "self_instruct" / "seed_tasks.jsonl"
# 8 of the 40 rows held out: 4 steps of 8 are one epoch of the other 32. Rows reach 512 tokens.
COMMON = [*TINY, "lora.dropout=0", "model.compute_dtype=float32", "model.gradient_checkpointing=false",
          "train.micro_batch_size=2", "train.global_batch_size=8", "train.max_steps=4", "train.save_steps=2",
          "checkpoint.keep_last=0", "data.source_max_len=256", "data.target_max_len=256", "data.eval_size=8",
          f"data.dataset={ROWS}"]
SP2 = "dist.sequence_parallel=2"
# fp32 sums in another order (an all-to-all, slices of rows, gradients summed over more ranks): measured
# 2e-7 on the adapter and 3e-7 on the loss; a lost or doubled gradient share is >1e-2.
TOLERANCE = 1e-5


def _case(name: str, *keys: str) -> str:
    return f"{name}:{','.join(keys)}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sp")
    worker = "tests/workers/train_cases.py"
    run_torchrun(1, str(out), "one", "--", *COMMON, script=worker, timeout=300)
    # N=2 and N=1 on 2 ranks, then each resumed from the other's checkpoint-2 under the other N, N=2 resumed
    # under N=2 (DeepSpeed's own load), and N=2 under ZeRO-3
    run_torchrun(2, str(out), _case("sp2", SP2), "dp2",
                 _case("sp2to1", f"copy={out / 'sp2' / 'checkpoint-2'}"),
                 _case("dp2to2", SP2, f"copy={out / 'dp2' / 'checkpoint-2'}"),
                 _case("sp2again", SP2, f"copy={out / 'sp2' / 'checkpoint-2'}"),
                 _case("sp2z3", SP2, "dist.ds_config=zero3"),
                 # the tiled MLP (issue 28) under ZeRO-3: the ranks' rows differ in length, so their tile
                 # counts would too; each rank runs the maximum (or the weight gathers would hang)
                 _case("z3tiled", "dist.ds_config=zero3", "model.tiled_mlp=on"),
                 "--", *COMMON, script=worker, timeout=400)
    run_torchrun(4, str(out), _case("sp2x2", SP2), "--", *COMMON, script=worker, timeout=300)
    return out


def _adapter(folder: Path) -> torch.Tensor:
    tensors = load_adapter_tensors(folder / "adapter_model")
    return torch.cat([tensors[k].double().flatten() for k in sorted(tensors)])


def _curve(folder: Path) -> torch.Tensor:
    """Loss and gradient norm of each step (the norm shows a gradient off by a constant, which Adam hides)."""
    return torch.tensor([(r["loss"], r["grad_norm"]) for r in read_metrics(folder) if "loss" in r], dtype=torch.float64)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize("run,reference", [("sp2", "one"), ("sp2z3", "one"), ("sp2x2", "dp2"), ("z3tiled", "one")],
                         ids=["N=2 on 2 ranks vs 1 rank", "N=2 under ZeRO-3 vs 1 rank", "2 groups x N=2 vs 2 ranks x N=1",
                              "tiled MLP on 2 ZeRO-3 ranks vs 1 rank untiled"])
def test_split_rows_train_as_one_rank_holding_them_whole(runs, run, reference):
    got, want = _curve(runs / run), _curve(runs / reference)
    assert got.shape == (4, 2) and want[-1, 0] < want[0, 0]
    difference = _relative(_adapter(runs / run), _adapter(runs / reference))
    print(f"{run} vs {reference}: adapter relative difference {difference:.2e}, "
          f"largest loss/grad-norm difference {(got - want).abs().max():.2e}")
    assert difference < TOLERANCE
    assert torch.allclose(got, want, rtol=TOLERANCE, atol=0)


@pytest.mark.slow
def test_one_rank_and_two_ranks_of_one_row_agree_with_data_parallelism(runs):
    """Not a tautology: the reference runs themselves agree (N=1 on 1 and on 2 ranks)."""
    assert _relative(_adapter(runs / "dp2"), _adapter(runs / "one")) < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("resumed,full", [("sp2to1", "sp2"), ("dp2to2", "dp2")], ids=["N=2 -> 1", "N=1 -> 2"])
def test_a_checkpoint_resumes_under_another_sequence_parallel_size(runs, resumed, full):
    got, want = _curve(runs / resumed), _curve(runs / full)
    assert got.shape == (2, 2)  # steps 3 and 4, after checkpoint-2
    assert torch.allclose(got, want[2:], rtol=TOLERANCE, atol=0)
    assert _relative(_adapter(runs / resumed), _adapter(runs / full)) < TOLERANCE


@pytest.mark.slow
def test_a_checkpoint_resumes_under_the_same_sequence_parallel_size_bitwise(runs):
    """The same world and N: DeepSpeed loads its own files (named by the rank within the group)."""
    a, b = load_adapter_tensors(runs / "sp2" / "adapter_model"), load_adapter_tensors(runs / "sp2again" / "adapter_model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_curve(runs / "sp2again"), _curve(runs / "sp2")[2:])


@pytest.mark.slow
def test_validation_after_training_is_a_fresh_process_s(runs):
    """The validation loss of the N=2 run, computed in the process whose attention Ulysses replaced, equals
    the one of the 1-rank run (a process without it): evaluation bypasses the all-to-all, mask and all."""
    def final(folder: Path) -> float:
        return [r for r in read_metrics(folder) if r.get("event") == "validation"][-1]["eval_loss"]

    assert final(runs / "sp2") == pytest.approx(final(runs / "one"), rel=TOLERANCE)


@pytest.mark.slow
def test_the_adapter_loads_with_peft_and_gives_the_one_rank_logits(runs, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_dist import compat

    def logits(adapter: Path) -> torch.Tensor:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4"))
        model = PeftModel.from_pretrained(base, str(adapter)).eval()
        compat.disable_cpu_weight_repacking(model)
        with torch.no_grad():
            return model(input_ids=torch.arange(4, 260).reshape(2, 128)).logits

    got, want = logits(runs / "sp2" / "adapter_model"), logits(runs / "one" / "adapter_model")
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.slow
def test_metrics_report_tokens_per_second_per_group_and_per_rank(runs):
    step = [r for r in read_metrics(runs / "sp2x2") if "loss" in r][0]
    # 4 ranks in 2 groups: a group's rate is twice a rank's
    assert step["tokens_per_s_per_group"] == pytest.approx(2 * step["tokens_per_s_per_gpu"])
    assert step["tokens"] == sum(r["tokens"] for r in read_metrics(runs / "one") if "loss" in r and r["step"] == 1)


# ------------------------------------------------------------------------------------- no ranks needed
def test_slices_of_shifted_rows_sum_to_the_whole_rows_loss():
    """The loss of each rank's slice (labels and weights shifted on the whole row first) sums to the loss
    of the whole rows; a slice shifted on its own would lose the label at each cut."""
    from qlora_dist.data.batches import IGNORE_INDEX as X, TokenizedExample, collate
    from qlora_dist.model.fastpath import weighted_cross_entropy
    from qlora_dist.model.loss import StepObjective, shard_for_group

    rows = [TokenizedExample(list(range(1, 8)), [X, X, 3, 4, 5, 6, 7]), TokenizedExample([1, 2, 3, 4], [X, 2, 3, 4])]
    whole = collate(rows, 0, multiple_of=4)
    assert whole["input_ids"].shape == (2, 8) and whole["position_ids"][0].tolist() == list(range(7)) + [0]
    weights = StepObjective.of("sequence", whole).weights(whole)
    logits = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    want = weighted_cross_entropy(logits, whole["labels"], weights)
    parts = []
    for rank in range(4):
        part, w = shard_for_group(whole, weights, 4, rank)
        assert part["input_ids"].shape == (2, 2) and "attention_mask" not in part
        parts.append(weighted_cross_entropy(logits[:, 2 * rank:2 * rank + 2], part["shift_labels"], w, shifted=True))
    assert torch.stack(parts).sum().item() == pytest.approx(want.item(), rel=1e-6)
    naive = sum(weighted_cross_entropy(logits[:, 2 * r:2 * r + 2], whole["labels"][:, 2 * r:2 * r + 2],
                                       weights[:, 2 * r:2 * r + 2]) for r in range(4))
    assert abs(naive.item() - want.item()) > 1e-2


REFUSALS = {
    "world size": (["--world-size", "3", SP2], "dist.sequence_parallel=2: the world size 3"),
    "packing": (["--world-size", "2", SP2, "data.packing=true"], "data.packing=true with dist.sequence_parallel=2"),
    "eager": (["--world-size", "2", SP2, "model.attn_implementation=eager"], "model.attn_implementation=eager"),
    "heads": (["--world-size", "3", "dist.sequence_parallel=3"], "4 attention heads and 2 KV heads"),
    "eager-only family": (["--world-size", "2", SP2, "model.path=tiny:gemma2"], "runs eager attention only"),
    "sliding window": (["--world-size", "2", SP2, "model.path=tiny:mistral", "data.source_max_len=4096"],
                       "sliding window of 4096 tokens, but rows reach 4224"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_sequence_parallelism_cannot_run_is_refused_before_loading(tmp_path, capsys, case):
    args, needle = REFUSALS[case]
    world, keys = args[:2], args[2:]
    code, lines = run_main(capsys, "check", *world, *TINY, *keys, f"train.output_dir={tmp_path}")
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines


def test_plan_refuses_what_the_shape_cannot_split(capsys):
    code, lines = run_main(capsys, "plan", "--preset", "7b-all", "--world-size", "3", "dist.sequence_parallel=3")
    assert code == 2 and len(lines) == 1 and "llama-7b has 32 attention heads and 32 KV heads" in lines[0], lines


def test_the_plan_holds_half_the_activations_per_rank_under_two():
    from qlora_dist import memory
    from qlora_dist.config import load_config

    # the tiled MLP off: its tile (a fixed number of tokens) would not halve (tests/test_long_samples.py plans it)
    cfg = lambda n: load_config(overrides=[*TINY, "model.path=random:7b", f"dist.sequence_parallel={n}",  # noqa: E731
                                           "data.source_max_len=8192", "data.target_max_len=8192", "model.tiled_mlp=off"])
    one, two = (memory.activation_items(memory.setup_from_config(cfg(n), 2)) for n in (1, 2))
    mask = "attention_mask (sequence x sequence)"
    assert mask in one and mask not in two  # padded rows build an L x L mask; Ulysses drops it (memory.py)
    # every per-token term halves; a layer's weight dequantized for its backward (0.09 GB of 16 GB) does not
    per_token = lambda items: sum(v for k, v in items.items() if k != mask)  # noqa: E731
    assert per_token(two) / per_token(one) == pytest.approx(0.5, abs=2e-3)
