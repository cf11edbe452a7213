"""The QLoRA recipe (Dettmers et al., 2023) as data: the one place that holds the paper's numbers.

Everything else (config defaults, presets, the `presets` command, the memory planner later) reads them
from here. Source: ../shared/RECIPE.md, which copies the paper's hyperparameter table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Settings shared by every run of the paper.
LORA_R = 64
LORA_ALPHA = 16
ADAM_BETA2 = 0.999
MAX_GRAD_NORM = 0.3
LR_SCHEDULE = "constant"
OPTIMIZER = "paged_adamw_32bit"
QUANT_TYPE = "nf4"
DOUBLE_QUANT = True
COMPUTE_DTYPE = "bfloat16"


def lora_dropout_for(size: str) -> float:
    """0.1 up to 13B, 0.05 for 33B and 65B (paper, appendix B.2)."""
    return 0.1 if size in ("7b", "13b") else 0.05


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int = 32000
    kv_heads: int | None = None  # None: as many as heads (LLaMA-1); Llama-3: 8 (grouped-query attention)
    rope_theta: float = 10000.0
    max_positions: int = 2048


# The one home of LLaMA shapes: the paper's LLaMA-1 sizes (PAPER_SIZES: the recipe's size classes) and the
# Llama-3 shapes used for long samples (Llama-3.1-8B / -70B's config.json: vocab 128,256, 8 KV heads,
# rope theta 500,000, 131,072 positions; untied lm_head).
LLAMA_SHAPES: dict[str, LlamaShape] = {
    "7b": LlamaShape(4096, 11008, 32, 32),
    "13b": LlamaShape(5120, 13824, 40, 40),
    "33b": LlamaShape(6656, 17920, 60, 52),
    "65b": LlamaShape(8192, 22016, 80, 64),
    "llama3-8b": LlamaShape(4096, 14336, 32, 32, 128256, 8, 500000.0, 131072),
    "llama3-70b": LlamaShape(8192, 28672, 80, 64, 128256, 8, 500000.0, 131072),
}
PAPER_SIZES = ("7b", "13b", "33b", "65b")


@dataclass(frozen=True)
class RecipeRow:
    size: str
    dataset: str  # "all" = every dataset without a row of its own
    batch: int  # global batch size (sequences per optimizer step)
    lr: float
    steps: int
    source_len: int | None  # None: the dataset is trained on its whole text (no source part)
    target_len: int


def _rows() -> list[RecipeRow]:
    table = {
        # size: (batch_all, lr, steps_all, batch_hh, steps_hh, batch_long, steps_long)
        "7b": (16, 2e-4, 10000, 16, 10000, 16, 4000),
        "13b": (16, 2e-4, 10000, 16, 10000, 16, 4000),
        "33b": (32, 1e-4, 5000, 32, 5000, 32, 2343),
        "65b": (64, 1e-4, 2500, 64, 2500, 32, 2343),
    }
    rows = []
    for size, (b_all, lr, s_all, b_hh, s_hh, b_long, s_long) in table.items():
        rows += [
            RecipeRow(size, "all", b_all, lr, s_all, 384, 128),
            RecipeRow(size, "oasst1", 16, lr, 1875, None, 512),
            RecipeRow(size, "hh-rlhf", b_hh, lr, s_hh, None, 768),
            RecipeRow(size, "longform", b_long, lr, s_long, 512, 1024),
        ]
    return rows


RECIPE_TABLE: list[RecipeRow] = _rows()


def _paper_preset(row: RecipeRow) -> dict[str, Any]:
    preset: dict[str, Any] = {
        # The paper's bases are not on this machine: a local LLaMA folder must be named.
        "model.path": None,
        "quantization.bits": 4,
        "quantization.quant_type": QUANT_TYPE,
        "quantization.double_quant": DOUBLE_QUANT,
        "model.compute_dtype": COMPUTE_DTYPE,
        "lora.r": LORA_R,
        "lora.alpha": LORA_ALPHA,
        "lora.dropout": lora_dropout_for(row.size),
        "optim.name": OPTIMIZER,
        "optim.lr": row.lr,
        "optim.beta2": ADAM_BETA2,
        "optim.max_grad_norm": MAX_GRAD_NORM,
        "optim.scheduler": LR_SCHEDULE,
        "optim.warmup_steps": 0,
        "train.global_batch_size": row.batch,
        "train.micro_batch_size": 1,
        "train.max_steps": row.steps,
        "data.target_max_len": row.target_len,
    }
    if row.source_len is not None:
        preset["data.source_max_len"] = row.source_len
    if row.dataset != "all":
        preset["data.dataset"] = row.dataset
    return preset


# Our own preset, not the paper's: SmolLM2-135M on the built-in tasks, sized to finish in minutes on
# 2 CPU cores. r=16/alpha=32 and LR 1e-3 with warm-up and decay learned the tasks in ~150 steps where the
# paper's r=64/alpha=16 at 2e-4 did not in that budget (../shared/STACK-NOTES.md, measured 2026-11-26).
# Activation checkpointing is off: a 135M model needs ~2.5 GB without it, and recomputation made a step
# ~40% slower (3.5 s vs 5 s on 2 cores).
DEMO_PRESET: dict[str, Any] = {
    "model.path": "smollm2",
    "model.gradient_checkpointing": False,
    "lora.r": 16,
    "lora.alpha": 32,
    "lora.dropout": 0.05,
    "optim.lr": 1e-3,
    "optim.scheduler": "linear",
    "optim.warmup_steps": 10,
    "train.global_batch_size": 16,
    "train.micro_batch_size": 16,
    "train.max_steps": 150,
    "train.save_steps": 50,
    "train.output_dir": "runs/demo",
    "data.dataset": "builtin",
    "data.source_max_len": 64,
    "data.target_max_len": 16,
    "eval.at_start": True,
    "eval.at_end": True,
    "eval.max_new_tokens": 12,
}


def preset_name(row: RecipeRow) -> str:
    return f"{row.size}-{row.dataset}"


PRESETS: dict[str, dict[str, Any]] = {preset_name(r): _paper_preset(r) for r in RECIPE_TABLE}
PRESETS["demo"] = DEMO_PRESET


# `--preset oasst1` (a dataset alone): the size class comes from the model's parameter count.
DATASET_PRESETS = tuple(dict.fromkeys(r.dataset for r in RECIPE_TABLE))


def format_table() -> str:
    """The recipe table as printed by `qlora-dist presets`."""
    head = f"{'preset':<14}{'batch':>6}{'LR':>9}{'steps':>7}{'src len':>9}{'tgt len':>9}{'dropout':>9}"
    lines = [head, "-" * len(head)]
    for row in RECIPE_TABLE:
        src = "-" if row.source_len is None else str(row.source_len)
        lines.append(
            f"{preset_name(row):<14}{row.batch:>6}{row.lr:>9.0e}{row.steps:>7}{src:>9}"
            f"{row.target_len:>9}{lora_dropout_for(row.size):>9}"
        )
    lines += [
        "",
        f"every paper preset: LoRA r={LORA_R} alpha={LORA_ALPHA} on all linear layers, {OPTIMIZER} "
        f"(beta2 {ADAM_BETA2}), max grad norm {MAX_GRAD_NORM}, {LR_SCHEDULE} LR, "
        f"{QUANT_TYPE.upper()} + double quant, {COMPUTE_DTYPE} compute",
        "demo: SmolLM2-135M-Instruct (embedded) on the built-in tasks, r=16 alpha=32, LR 1e-3, 150 steps",
        f"a dataset alone ({', '.join(DATASET_PRESETS)}): the size class nearest to model.path's parameter "
        "count (e.g. --preset oasst1 model.path=<Llama-3-70B folder> is 65b-oasst1)",
    ]
    return "\n".join(lines)
