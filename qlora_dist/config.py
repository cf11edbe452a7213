"""Typed, grouped, validated configuration: defaults < preset < YAML file < `key=value` overrides.

Every problem (unknown key, wrong type, value out of range) is collected and raised once, as a
ConfigError naming the key, where it came from (file and line, override or preset) and what is allowed.
This module is the schema and its range checks only: nothing here reads a file the config names (the
dataset, the model folder, the DeepSpeed JSON, the MMLU file); that is the preflight's (preflight.py).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qlora_dist import recipe
from qlora_dist.errors import ConfigError
from qlora_dist.precision import COMPUTE_DTYPES, QUANT_TYPES

# The names data.format and data.tasks accept: part of the schema, so they live here, below their owners
# (data/formats.py, data/tasks.py), which define one entry per name and check at import that the names match.
FORMAT_NAMES = ("alpaca", "chip2", "hh-rlhf", "oasst1", "self-instruct", "self-instruct-instances",
                "unnatural-instructions", "flan-v2", "flan-cot", "input-output", "messages", "sharegpt")
TASK_NAMES = ("sort_digits", "add", "uppercase")
# lora.init: how the adapter's weights start (model/adapter_init.py owns what each does).
INIT_METHODS = ("default", "gaussian", "loftq", "pissa")
# lora.target_modules presets, each standing alone: what each names on a model is model/base.py's TARGET_PRESETS
TARGET_PRESET_NAMES = ("all-linear", "attention")


def parse_size(text: str) -> int:
    """'24000MB', '40GiB', '48GB', '1.5TB' -> bytes (MB/GB decimal, MiB/GiB binary)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B)\s*", str(text), re.IGNORECASE)
    if not m or m.group(1).count(".") > 1:
        raise ValueError(f"not a memory size: {text!r} (e.g. 24000MB, 40GiB)")
    unit = m.group(2).upper()
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    return int(float(m.group(1)) * (1024 if "I" in unit else 1000) ** power)


# ------------------------------------------------------------------------------------------- ranges
# One set of range checks for the config's keys and the commands' options (cli.py uses the same ones):
# each problem names its own key or option, what is allowed and what it got.
# A seed up to 2^32 - 1: the batch order and the validation split seed torch generators (64 bits) with
# seed x 100,003 + epoch and seed x 7,919 + ...; a larger seed passed the config and overflowed there.
SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the bound itself excluded
    high_open: bool = False
    integer: bool = False
    what: str = ""  # how the message says the kind of number ("a number", "an integer"); "" for neither

    def describe(self, kind: bool = True) -> str:
        kind = f"{self.what} " if self.what and kind else ""
        if self.low is not None and self.high is not None:
            return f"{kind}in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{kind}{'>' if self.low_open else '>='} {self.low}"
        return f"{kind}{'<' if self.high_open else '<='} {self.high}".strip()

    def problem(self, name: str, value: Any) -> str | None:
        """'name: must be ... (got value)' when value is outside the range (or not a finite number)."""
        got = value if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)
        number = isinstance(value, int) if self.integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not number or not math.isfinite(value):
            return f"{name}: must be {'an integer' if self.integer else 'a finite number'} {self.describe(False)} (got {got})"
        low_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        high_bad = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"{name}: must be {self.describe()} (got {got})" if low_bad or high_bad else None


POSITIVE = Range(0, low_open=True)
COUNT = Range(0)  # 0 allowed (often: none, or all)
FRACTION = Range(0, 1, high_open=True)  # [0, 1): dropout, Adam's betas
SEED = Range(0, SEED_MAX, integer=True, what="an integer")
TEMPERATURE = Range(0)  # 0: greedy
TOP_P = Range(0, 1, low_open=True)
INIT_ITERS = Range(1, 100, integer=True, what="an integer")
WEIGHT = Range(0, low_open=True, what="a number")


def range_problems(checks: list[tuple[str, Any, Range]]) -> list[str]:
    """Every (name, value, range) whose value is out of its range, one line each, in order."""
    return [p for name, value, allowed in checks if (p := allowed.problem(name, value))]


def choice(default: Any, choices: tuple, help: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "help": help})


def opt(default: Any, help: str = "") -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    path: str | None = opt("smollm2", "local HF folder of a tested family (README.md), or 'smollm2' / "
                                      "'tiny-llama' / 'tiny:<family>' (built in)")
    compute_dtype: str = choice("auto", COMPUTE_DTYPES, "auto: bf16 on CUDA and on CPUs with native bf16, fp32 on "
                                                    "other CPUs (qlora_dist/precision.py); NF4 storage is unchanged")
    gradient_checkpointing: bool | str = choice(True, (True, False, "offload"),
                                                "recompute activations in backward (saves memory); offload: "
                                                "also keep each layer's checkpointed input in pinned host memory "
                                                "between forward and backward (DeepSpeed's "
                                                "CheckpointHiddenStatesOffload; model/longseq.py)")
    tiled_mlp: str = choice("auto", ("auto", "on", "off"),
                            "run each layer's MLP by tiles of ~hidden-size tokens, recomputed tile by tile in "
                            "backward (model/longseq.py): auto tiles rows of >= 8,192 tokens (per rank), where "
                            "the MLP's intermediate activations dominate a layer's")
    attn_implementation: str = choice("sdpa", ("sdpa", "eager"))
    loader: str = choice("auto", ("auto", "hf", "layerwise"),
                         "hf: transformers from_pretrained; layerwise: quantize and partition layer by layer "
                         "(auto: layerwise under ZeRO-3, so no rank ever holds the whole model)")
    fused_loss: bool = opt(True, "loss through lm_head by chunks of tokens, never the full fp32 logits "
                                 "(qlora_dist/fastpath.py); false: transformers' own loss")
    fused_lora: bool = opt(True, "LoRA's product, scaling and sum in one matmul (qlora_dist/fastpath.py); "
                                 "false: peft's own forward")
    compile_kernels: bool = opt(False, "torch.compile RMSNorm, SwiGLU and the rotary embedding into fused "
                                       "kernels (the first steps compile; qlora_dist/fastpath.py)")
    allow_base_mismatch: bool = opt(False, "start from train.init_adapter (or resume a checkpoint) although its "
                                           "adapter records another base (model type, config.json, layer shapes, "
                                           "quantization); by default that is an error")

    def check(self) -> list[str]:
        if not self.path:
            return ["model.path: required: a local Hugging Face model folder (a family of README.md's table), "
                    "or 'smollm2' / 'tiny-llama' / 'tiny:<family>'"]
        return []


@dataclass
class QuantizationConfig:
    bits: int = choice(4, (4, 8, 16), "4 = NF4/FP4 QLoRA; 8 = LLM.int8 base (bitsandbytes; not under the layer-wise "
                                      "ZeRO-3 loader); 16 = LoRA on a 16-bit base (the older name of train.method=lora)")
    quant_type: str = choice(recipe.QUANT_TYPE, QUANT_TYPES)
    double_quant: bool = opt(recipe.DOUBLE_QUANT, "quantize the quantization constants too")


@dataclass
class LoraConfig:
    r: int = opt(recipe.LORA_R)
    alpha: float = opt(recipe.LORA_ALPHA)
    dropout: float = opt(0.1)
    target_modules: list[str] = opt(["all-linear"], "'all-linear' (every nn.Linear but lm_head), 'attention' (the "
                                                    "attention projections: q/k/v/o_proj, Phi-3 qkv_proj/o_proj) "
                                                    "or module names")
    # The adapter's form and its scaling; how its weights start (a later lora.init) is a separate key.
    variant: str = choice("lora", ("lora", "dora"), "lora: W + s*BA; dora: weight-decomposed LoRA, a trained "
                                                    "magnitude per output row (peft's use_dora; model/base.py)")
    rslora: bool = opt(False, "rank-stabilised scaling alpha/sqrt(r) instead of alpha/r (peft's use_rslora)")
    init: str = choice("default", INIT_METHODS,
                       "how B and A start (model/adapter_init.py): default: A random, B zero (peft's); gaussian: "
                       "A normal(1/r); loftq: the rank-r part of the NF4 error, base re-quantized (4-bit only); "
                       "pissa: the top-r singular part of W, the residual is the (quantized) base")
    init_iters: int = opt(1, "lora.init=loftq: alternating quantize / SVD steps (LoftQ's T)")

    def check(self) -> list[str]:
        errs = []
        if self.r <= 0:
            errs.append(f"lora.r: must be a positive integer (got {self.r})")
        errs += range_problems([("lora.alpha", self.alpha, POSITIVE), ("lora.dropout", self.dropout, FRACTION)])
        if not self.target_modules:
            errs.append("lora.target_modules: must name at least one module, or 'all-linear' or 'attention'")
        elif len(self.target_modules) > 1 and set(self.target_modules) & set(TARGET_PRESET_NAMES):
            errs.append(f"lora.target_modules: 'all-linear' and 'attention' stand alone, not in a list of names "
                        f"(got {self.target_modules})")
        errs += range_problems([("lora.init_iters", self.init_iters, INIT_ITERS)])
        return errs


@dataclass
class DataConfig:
    dataset: Any = opt("builtin", "'builtin' (checkable built-in tasks), a dataset name (alpaca, alpaca-clean, "
                                  "chip2, hh-rlhf, unnatural-instructions, longform, self-instruct, flan-v2, "
                                  "oasst1: read from the HF datasets cache), a local file or folder, or a list of "
                                  "them (a mixture: each item a name/path or {path, format, weight}; see entries)")
    format: str | None = opt(None, "how to map records to source/target; default: from the name or columns")
    tasks: list[str] = opt(["sort_digits", "add", "uppercase"], "built-in tasks to train on")
    num_train: int = opt(1200, "built-in tasks: training examples per task")
    num_eval: int = opt(60, "built-in tasks: held-out examples per task")
    source_max_len: int = opt(384, "tokens kept of the source (prompt)")
    target_max_len: int = opt(128, "tokens kept of the target (answer)")
    train_on_source: bool = opt(False, "also train on the source tokens")
    chat_template: str = choice("guanaco", ("guanaco", "tokenizer"),
                                "chat data (formats messages, sharegpt): guanaco ('### Human: ... ### Assistant:', "
                                "the seed's) or tokenizer (the model's own chat template); a conversation keeps "
                                "the whole turns that fit in source_max_len + target_max_len tokens")
    group_by_length: bool = opt(False, "micro-batches of similar lengths (less padding)")
    packing: bool = opt(False, "several examples per sequence, no attention across them")
    pack_length: int = opt(0, "tokens per packed sequence (0: source_max_len + target_max_len)")
    strict: bool = opt(False, "stop at the first bad row (naming file, line, field) instead of skipping it")
    max_row_chars: int = opt(200_000, "rows longer than this (source + target characters) are bad rows")
    max_examples: int = opt(0, "use only the first N examples (of each dataset of a mixture; 0: all)")
    cache_dir: str | None = opt(None, "tokenized-data cache (default: train.output_dir/data-cache); must be "
                                      "visible to every rank")
    allow_changed: bool = opt(False, "resume a checkpoint although the training data's content changed since "
                                     "(logged); by default that is an error")
    eval_size: int = opt(0, "validation loss on this many tokenized training rows, held out by train.seed "
                            "(qlora.py's eval_dataset_size; 0: none)")
    eval_dataset: str | None = opt(None, "validation loss on this file or dataset instead, prepared like data.dataset")

    def check(self) -> list[str]:
        errs = self._dataset_problems()
        unknown = [t for t in self.tasks if t not in TASK_NAMES]
        if unknown:
            errs.append(f"data.tasks: unknown task(s) {unknown}; available: {sorted(TASK_NAMES)}")
        if self.format is not None and self.format not in FORMAT_NAMES:
            errs.append(f"data.format: unknown {self.format!r}; choose one of {', '.join(FORMAT_NAMES)}")
        errs += range_problems([(f"data.{k}", getattr(self, k), POSITIVE) for k in
                                ("num_train", "num_eval", "source_max_len", "target_max_len", "max_row_chars")]
                               + [(f"data.{k}", getattr(self, k), COUNT) for k in ("pack_length", "max_examples", "eval_size")])
        if self.pack_length and self.pack_length < self.source_max_len + self.target_max_len:
            errs.append(f"data.pack_length: {self.pack_length} is shorter than one example can be "
                        f"(source_max_len + target_max_len = {self.source_max_len + self.target_max_len})")
        if self.eval_size and self.eval_dataset:
            errs.append("data.eval_size: set it or data.eval_dataset, not both (one validation split)")
        if self.packing and self.group_by_length:
            errs.append("data.group_by_length: has no use with data.packing=true (packed rows are all about "
                        "pack_length long); set one of them")
        return errs

    def entries(self) -> list[DatasetEntry]:
        """data.dataset as its datasets (one, or a mixture's, in order; call after check)."""
        if not isinstance(self.dataset, list):
            return [DatasetEntry("data.dataset", str(self.dataset), self.format)]
        return [DatasetEntry(f"data.dataset[{i}]", str(e), self.format) if not isinstance(e, dict) else
                DatasetEntry(f"data.dataset[{i}]", str(e["path"]), e.get("format", self.format),
                             float(e.get("weight", 1.0))) for i, e in enumerate(self.dataset)]

    def _dataset_problems(self) -> list[str]:
        if isinstance(self.dataset, str) and self.dataset:
            return []
        if not isinstance(self.dataset, list) or not self.dataset:
            return [f"data.dataset: expected a dataset name or path, or a non-empty list of them (got {self.dataset!r})"]
        errs = []
        for i, item in enumerate(self.dataset):
            key, e = f"data.dataset[{i}]", item if isinstance(item, dict) else {"path": item}
            if not isinstance(e.get("path"), str) or e["path"] in ("", "builtin") or set(e) - {*DatasetEntry.KEYS}:
                errs.append(f"{key}: expected a dataset name or path, or {{path, format, weight}} (got {item!r}); "
                            "'builtin' cannot be part of a mixture")
            elif e.get("format") is not None and e["format"] not in FORMAT_NAMES:
                errs.append(f"{key}: format: unknown {e['format']!r}; choose one of {', '.join(FORMAT_NAMES)}")
            elif problem := WEIGHT.problem(f"{key}: weight", e.get("weight", 1.0)):
                errs.append(problem)
        return errs


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of data.dataset. A mixture's datasets are concatenated in order (the rows then shuffled by
    the batch schedule); weight w takes round(w x N) of a dataset's N examples: all of them floor(w) times,
    plus a seeded sample (train.seed) of the rest, each in file order (so 0.5: half, 2.5: each twice and
    half once more)."""
    KEYS = ("path", "format", "weight")
    key: str  # what errors name: data.dataset, or data.dataset[i] in a mixture
    path: str
    format: str | None
    weight: float = 1.0

@dataclass
class OptimConfig:
    name: str = choice(recipe.OPTIMIZER, ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_32bit", "adamw_torch"))
    lr: float = opt(2e-4)
    beta1: float = opt(0.9)
    beta2: float = opt(recipe.ADAM_BETA2)
    eps: float = opt(1e-8)
    weight_decay: float = opt(0.0)
    max_grad_norm: float = opt(recipe.MAX_GRAD_NORM, "0 disables clipping")
    scheduler: str = choice(recipe.LR_SCHEDULE, ("constant", "linear", "cosine"), "after warm-up")
    warmup_steps: int = opt(0)
    master_weights: str = choice("gpu", ("gpu", "paged"),
                                 "where DeepSpeed's fp32 master copy of the LoRA weights lives: gpu (DeepSpeed's "
                                 "layout, in the GPU allocator) or paged (CUDA unified memory beside the paged "
                                 "optimizer states, outside the allocator; the driver evicts it to host RAM under "
                                 "pressure). CUDA only; not with an offload ds_config (masters already on the host)")

    def check(self) -> list[str]:
        errs = []
        errs += range_problems([("optim.lr", self.lr, POSITIVE)]
                               + [(f"optim.{k}", getattr(self, k), FRACTION) for k in ("beta1", "beta2")]
                               + [(f"optim.{k}", getattr(self, k), COUNT)
                                  for k in ("eps", "weight_decay", "max_grad_norm", "warmup_steps")])
        if self.scheduler in ("linear", "cosine") and self.warmup_steps == 0:
            # deepspeed 0.19.8's WarmupDecayLR and WarmupCosineLR refuse 0 warm-up steps (a ValueError at
            # engine start, after the model has loaded): say it here, before anything is loaded
            errs.append(f"optim.warmup_steps: the {self.scheduler} schedule needs at least 1 warm-up step "
                        "(DeepSpeed's schedulers); set optim.warmup_steps>=1 or optim.scheduler=constant")
        return errs


METHODS = ("qlora", "lora", "full")


@dataclass
class TrainConfig:
    output_dir: str = opt("runs/default")
    method: str = choice("qlora", METHODS, "qlora: LoRA on a quantized base (quantization.*); lora: LoRA on a 16-bit "
                                           "base; full: every weight trained in 16 bits, fp32 masters and Adam "
                                           "states (no lora.*, quantization.* or train.init_adapter)")
    max_steps: int = opt(100, "optimizer steps")
    save_steps: int = opt(50, "checkpoint every N optimizer steps (and at the end)")
    seed: int = opt(42)
    global_batch_size: int = opt(16, "sequences per optimizer step, whatever the world size")
    micro_batch_size: int | str = opt(4, "sequences per rank per forward pass, or 'auto': the fastest micro "
                                         "batch (and checkpointing choice) under train.max_memory_per_gpu")
    max_memory_per_gpu: str | None = opt(None, "cap per GPU, e.g. 24000MB or 40GiB: planned before loading, "
                                               "enforced on every rank")
    logging_steps: int = opt(1)
    init_adapter: str | None = opt(None, "a PEFT adapter folder to start from (weights only, fresh optimizer); "
                                         "lora.* keys you did not set take its values, ones you set must match")
    loss_normalization: str = choice("sequence", ("sequence", "token"),
                                     "sequence: mean over the global batch's examples of each one's mean loss over "
                                     "its target tokens (qlora.py's); token: over all its target tokens. Either is "
                                     "the same whatever the micro batch, accumulation and world size (model/loss.py)")
    max_nonfinite_steps: int = opt(3, "steps whose loss or gradient norm is NaN/inf are skipped (no update); "
                                      "after more than this many in a run, it stops with an error")
    report_to: list[str] = opt([], "experiment trackers besides metrics.jsonl: tensorboard, wandb, mlflow "
                                   "(offline / file store under train.output_dir unless WANDB_* / "
                                   "MLFLOW_TRACKING_URI say otherwise; train/trackers.py)")

    def check(self) -> list[str]:
        errs = []
        errs += [f"train.report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}"
                 for name in self.report_to if name not in TRACKERS]
        errs += range_problems([("train.max_nonfinite_steps", self.max_nonfinite_steps, COUNT),
                                ("train.seed", self.seed, SEED)])
        auto = self.micro_batch_size == "auto"
        if isinstance(self.micro_batch_size, str) and not auto:
            errs.append(f"train.micro_batch_size: a positive integer or 'auto' (got {self.micro_batch_size!r})")
        keys = ("max_steps", "save_steps", "global_batch_size", "logging_steps") + (() if auto else ("micro_batch_size",))
        for key in keys:
            if not isinstance(getattr(self, key), str) and getattr(self, key) <= 0:
                errs.append(f"train.{key}: must be > 0 (got {getattr(self, key)})")
        if self.max_memory_per_gpu is not None:
            try:
                parse_size(self.max_memory_per_gpu)
            except ValueError as exc:
                errs.append(f"train.max_memory_per_gpu: {exc}")
        elif auto:
            errs.append(AUTO_NEEDS_CAP)
        if isinstance(self.micro_batch_size, str):
            return errs
        if self.global_batch_size > 0 and self.micro_batch_size > 0 and self.global_batch_size % self.micro_batch_size:
            errs.append(
                f"train.global_batch_size: {self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size {self.micro_batch_size}"
            )
        return errs

    def grad_accum(self, world_size: int) -> int:
        """Accumulation steps that keep the global batch whatever the world size."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError([
                f"train.global_batch_size: {self.global_batch_size} is not divisible by micro_batch_size "
                f"{self.micro_batch_size} x world size {world_size}; pick a micro batch or world size that divides it"
            ])
        return self.global_batch_size // per_step


@dataclass
class EvalConfig:
    at_start: bool = opt(False, "built-in tasks: held-out exact match (and the validation loss) before training")
    at_end: bool = opt(True, "built-in tasks: held-out exact match after training")
    steps: int = opt(0, "also every N steps (0: never); the validation loss too (data.eval_size / eval_dataset)")
    batch_size: int = opt(32)
    max_new_tokens: int = opt(16)
    mmlu_data: str | None = opt(None, "MMLU questions: a hendrycks folder (dev/ val/ test/ CSVs) or a JSON-lines "
                                      "file like qlora's data/mmlu/*.json; None: no MMLU")
    mmlu_split: str = choice("val", ("val", "test"), "hendrycks folder: the split asked")
    mmlu_shots: int = choice(5, (0, 5), "hendrycks folder: dev examples per prompt (JSON lines carry their own)")
    mmlu_steps: int = opt(0, "MMLU every N steps (0: never)")
    mmlu_at_end: bool = opt(True, "MMLU after training (when eval.mmlu_data is set)")
    mmlu_max_questions: int = opt(0, "evenly spaced subset of this many questions (0: all)")
    mmlu_batch_size: int = opt(8, "questions per forward pass")

    def check(self) -> list[str]:
        errs = range_problems([(f"eval.{k}", getattr(self, k), POSITIVE)
                               for k in ("batch_size", "max_new_tokens", "mmlu_batch_size")]
                              + [(f"eval.{k}", getattr(self, k), COUNT) for k in ("steps", "mmlu_steps", "mmlu_max_questions")])
        if self.mmlu_data is None and self.mmlu_steps:
            errs.append("eval.mmlu_steps: needs eval.mmlu_data (an MMLU folder or JSON-lines file)")
        return errs  # the MMLU file itself is read by the preflight


@dataclass
class CheckpointConfig:
    keep_last: int = opt(2, "complete checkpoints kept (0: all)")
    resume: bool = opt(True, "continue from the newest complete checkpoint in train.output_dir")
    keep_best: bool = opt(False, "also keep the checkpoint of the lowest validation loss (needs data.eval_size "
                                 "or data.eval_dataset; every checkpoint is then validated)")

    def check(self) -> list[str]:
        return range_problems([("checkpoint.keep_last", self.keep_last, COUNT)])


@dataclass
class DistConfig:
    ds_config: str = opt("zero2", "zero2 | zero3 | zero3_offload | path to a DeepSpeed JSON")
    backend: str = choice("auto", ("auto", "gloo", "nccl"), "auto: nccl on GPUs, gloo on CPU")
    timeout_s: int = opt(600, "collective timeout: a dead rank fails the others after this")
    sequence_parallel: int = opt(1, "ranks that share one sequence (Ulysses, DeepSpeed's ALST): groups of this many "
                                    "ranks split each row; data parallelism runs across the groups (world size = "
                                    "this x data-parallel size); the global batch counts sequences whatever it is")

    def check(self) -> list[str]:
        errs = range_problems([("dist.timeout_s", self.timeout_s, POSITIVE)])
        if not isinstance(self.sequence_parallel, int) or self.sequence_parallel < 1:
            errs.append(f"dist.sequence_parallel: a positive integer (got {self.sequence_parallel!r})")
        return errs

    def data_parallel(self, world_size: int) -> int:
        """Ranks that see different rows: one per group of dist.sequence_parallel ranks."""
        return max(world_size // self.sequence_parallel, 1)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    preset: str | None = None  # recorded for the saved config; not a key users set
    # Dotted keys the user set (YAML or key=value; not defaults or presets): a starting adapter's
    # adapter_config.json must agree with these, and fills in the others (model/adapter.py).
    user_keys: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "user_keys"}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


GROUPS = [f.name for f in dataclasses.fields(Config) if f.name not in ("preset", "user_keys")]
# train.report_to name -> (the module that must be importable, the pip extra that brings it): train/trackers.py
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
AUTO_NEEDS_CAP = "train.micro_batch_size: 'auto' needs train.max_memory_per_gpu (the cap to fit under)"
# Keys that were renamed: an old name is an error that names the new one.
RENAMED = {"train.resume_from": "train.init_adapter"}


# ---------------------------------------------------------------------------------------------------
# Loading: every source becomes a list of (dotted key, value, origin) assignments.

Assignment = tuple[str, Any, str]


def _yaml_assignments(path: Path) -> tuple[list[Assignment], list[str]]:
    """Flatten a YAML file into dotted-key assignments, each with its file:line origin."""
    try:
        root = yaml.compose(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return [], [f"{path}: config file not found"]
    except IsADirectoryError:
        return [], [f"{path}: is a folder, not a YAML config file"]
    except UnicodeDecodeError as exc:
        return [], [f"{path}: not a YAML text file (byte {exc.start} is not UTF-8)"]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        return [], [f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}"]
    if root is None:
        return [], []
    if not isinstance(root, yaml.MappingNode):
        return [], [f"{path}: the top level must be a mapping of groups ({', '.join(GROUPS)})"]
    out: list[Assignment] = []
    errs = _duplicate_keys(path, root)
    for key_node, group_node in root.value:
        group, where = key_node.value, f"{path}:{key_node.start_mark.line + 1}"
        if not isinstance(group_node, yaml.MappingNode):
            errs.append(f"{where}: {group}: expected a mapping of keys under the group")
            continue
        for k_node, v_node in group_node.value:
            value = yaml.safe_load(yaml.serialize(v_node))
            out.append((f"{group}.{k_node.value}", value, f"{path}:{k_node.start_mark.line + 1}"))
    return out, errs


def _duplicate_keys(path: Path, root: yaml.MappingNode) -> list[str]:
    """PyYAML keeps the last of two equal keys silently; a config where one line is ignored is an error."""
    errs, nodes = [], [(root, "")]
    while nodes:
        node, prefix = nodes.pop()
        seen: dict[str, int] = {}
        for k_node, v_node in node.value:
            key, line = f"{prefix}{k_node.value}", k_node.start_mark.line + 1
            if key in seen:
                errs.append(f"{path}:{line}: duplicate key {key!r} (first at line {seen[key]})")
            seen.setdefault(key, line)
            if isinstance(v_node, yaml.MappingNode):
                nodes.append((v_node, key + "."))
    return errs


def _override_assignments(overrides: list[str]) -> tuple[list[Assignment], list[str]]:
    out, errs = [], []
    for text in overrides:
        key, sep, raw = text.partition("=")
        if not sep or not key:
            errs.append(f"override {text!r}: expected key=value, e.g. train.max_steps=100")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value, f"override {text!r}"))
    return out, errs


def _field_type(group: str, key: str) -> Any:
    cls = type(getattr(Config(), group))
    return typing.get_type_hints(cls)[key]


def _coerce(value: Any, typ: Any) -> Any:
    """Convert a YAML/override value to the field's type; raise TypeError with what was expected."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if typ is Any:  # checked by its group's check() (data.dataset: a string or a list of entries)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        expected = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg)
            except TypeError as exc:
                expected.append(str(exc))
        raise TypeError(" or ".join(expected))
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise TypeError("a list")
        return [_coerce(v, args[0]) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError("an integer")
    if typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:  # YAML 1.1 reads '2e-4' (no dot) as a string
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):  # nan and inf pass every range check
            raise TypeError("a finite number")
        return number
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError("a string")
    raise TypeError(f"a {typ}")


def _apply(cfg: Config, assignments: list[Assignment]) -> list[str]:
    errs = []
    for key, value, origin in assignments:
        if key in RENAMED:
            errs.append(f"{origin}: {key} was renamed: use {RENAMED[key]}")
            continue
        group, _, name = key.partition(".")
        if group not in GROUPS:
            hint = difflib.get_close_matches(group, GROUPS, n=1)
            errs.append(f"{origin}: unknown group {group!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + f"; groups: {', '.join(GROUPS)}")
            continue
        group_obj = getattr(cfg, group)
        names = [f.name for f in dataclasses.fields(group_obj)]
        if name not in names:
            hint = difflib.get_close_matches(name, names, n=1)
            errs.append(f"{origin}: unknown key {key!r}" + (f" (did you mean '{group}.{hint[0]}'?)" if hint else "")
                        + f"; keys of {group}: {', '.join(names)}")
            continue
        choices = next(f.metadata.get("choices") for f in dataclasses.fields(group_obj) if f.name == name) or ()
        if isinstance(value, bool) and "on" in choices and "off" in choices:
            value = "on" if value else "off"  # YAML 1.1 reads on/off as booleans (model.tiled_mlp=off)
        try:
            coerced = _coerce(value, _field_type(group, name))
            if bool in typing.get_args(_field_type(group, name)) and coerced not in choices:
                # a key that is a bool or a word (model.gradient_checkpointing: true, false, offload)
                raise TypeError(", ".join(str(c).lower() for c in choices[:-1]) + f" or {choices[-1]}")
            setattr(group_obj, name, coerced)
        except TypeError as exc:
            errs.append(f"{origin}: {key}: expected {exc}, got {value!r}")
    return errs


def _check_choices(cfg: Config) -> list[str]:
    errs = []
    for group in GROUPS:
        obj = getattr(cfg, group)
        for f in dataclasses.fields(obj):
            choices = f.metadata.get("choices")
            if choices and getattr(obj, f.name) not in choices:
                errs.append(f"{group}.{f.name}: {getattr(obj, f.name)!r} is not allowed; choose one of "
                            + ", ".join(map(str, choices)))
        if hasattr(obj, "check"):
            errs += obj.check()
    if cfg.checkpoint.keep_best and not (cfg.data.eval_size or cfg.data.eval_dataset):
        errs.append("checkpoint.keep_best: needs a validation split: set data.eval_size or data.eval_dataset")
    return errs


def load_config(path: str | Path | None = None, preset: str | None = None, overrides: list[str] = ()) -> Config:
    """Build the run's Config; raise ConfigError listing every problem at once."""
    cfg, errs = parse_config(path, preset, overrides)
    if errs:
        raise ConfigError(errs)
    return cfg


def parse_config(path: str | Path | None = None, preset: str | None = None,
                 overrides: list[str] = ()) -> tuple[Config, list[str]]:
    """The Config and every problem found in it (a value that failed keeps its default), so a preflight
    can add the problems of the files it names and report them all at once."""
    cfg, errs, user = Config(), [], []
    if preset is not None:
        if preset in recipe.DATASET_PRESETS:  # resolved before this, from the model: run_plan.parse_run_config
            errs.append(f"--preset {preset!r}: a dataset alone takes its size class from model.path; "
                        "name the size (e.g. --preset 7b-" + preset + ")")
        elif preset not in recipe.PRESETS:
            hint = difflib.get_close_matches(preset, recipe.PRESETS, n=1)
            errs.append(f"--preset {preset!r}: unknown" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + "; run `qlora-dist presets` for the list")
        else:
            cfg.preset = preset
            errs += _apply(cfg, [(k, v, f"preset {preset}") for k, v in recipe.PRESETS[preset].items()])
    if path is not None:
        assigns, perrs = _yaml_assignments(Path(path))
        errs += perrs + _apply(cfg, assigns)
        user += assigns
    assigns, perrs = _override_assignments(list(overrides))
    errs += perrs + _apply(cfg, assigns)
    cfg.user_keys = frozenset(key for key, _, _ in user + assigns)
    errs += resolve_method(cfg, {key: origin for key, _, origin in user + assigns})
    # A value that failed to parse kept its default, so range checks on the rest stay meaningful.
    errs += _check_choices(cfg)
    return cfg, errs


# Keys that mean nothing to full fine-tuning: set by the user with train.method=full, an error.
NOT_FOR_FULL = ("lora.", "quantization.", "train.init_adapter")


def resolve_method(cfg: Config, origins: dict[str, str]) -> list[str]:
    """Make train.method and quantization.bits agree (in place): quantization.bits=16 is the older name of
    train.method=lora and resolves to it; lora and full run a 16-bit base (bits 16). A contradiction the
    user wrote, or a key full fine-tuning has no use for, is one line naming the keys and where they were set."""
    method, bits, user = cfg.train.method, cfg.quantization.bits, cfg.user_keys
    where = lambda key: f"{key} ({origins.get(key, 'default')})"  # noqa: E731
    if method == "full":
        stray = sorted(k for k in user if k.startswith(NOT_FOR_FULL))
        cfg.quantization.bits = 16
        return [f"train.method: full trains every weight in 16 bits, but {', '.join(map(where, stray))} "
                "configure LoRA or quantization; remove them, or use train.method=lora or qlora"] if stray else []
    if method == "qlora" and bits == 16:
        if "train.method" in user:
            return [f"{where('train.method')}: qlora quantizes the base, but {where('quantization.bits')} is 16; "
                    "use train.method=lora for LoRA on a 16-bit base"]
        cfg.train.method = "lora"
    elif method == "lora" and bits != 16:
        if "quantization.bits" in user:
            return [f"{where('train.method')}: lora keeps the base in 16 bits, but {where('quantization.bits')} is "
                    f"{bits}; use train.method=qlora for a quantized base"]
        cfg.quantization.bits = 16
    return []


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved by `to_dict` (e.g. beside a checkpoint)."""
    cfg = Config()
    assigns = [(f"{g}.{k}", v, "saved config") for g, d in data.items() if g in GROUPS for k, v in d.items()]
    errs = _apply(cfg, assigns)
    if errs:
        raise ConfigError(errs)
    cfg.preset = data.get("preset")
    return cfg


# Keys that may change between a checkpoint and the run that resumes it: they do not change what
# the next optimizer step computes. Everything else must match (see train/checkpoint.py, resume_point).
# Keys added after checkpoints existed whose default does what the versions before them did: a checkpoint
# saved without one resumes under its default (another value is a difference like any other).
ADDED_AT_DEFAULT = {"data.eval_size": 0, "data.chat_template": "guanaco", "lora.variant": "lora", "lora.rslora": False,
                    "lora.init": "default", "lora.init_iters": 1}
RESUMABLE_CHANGES = (
    "train.output_dir", "train.max_steps", "train.save_steps", "train.logging_steps", "train.micro_batch_size",
    "train.max_memory_per_gpu", "model.gradient_checkpointing", "model.tiled_mlp", "eval.", "checkpoint.", "dist.", "preset",
    "data.cache_dir", "train.max_nonfinite_steps", "data.allow_changed", "train.report_to", "data.eval_dataset",
    "model.allow_base_mismatch",  # a permission, not a value the next step computes with
    "optim.master_weights",  # where the masters live, not their values (tests/test_paged_masters.py: bitwise)
)


def flat(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for group, values in cfg_dict.items():
        if isinstance(values, dict):
            out.update({f"{group}.{k}": v for k, v in values.items()})
        else:
            out[group] = values
    return out
