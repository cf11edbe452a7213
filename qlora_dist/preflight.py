"""The preflight: every problem of a run that can be known before a weight is read, found at once.

It runs on rank 0 (from `train`, `check`, `submit` before anything is queued, and the slurm/ scripts
before srun) and reads only small things: the config and the DeepSpeed JSON, the model folder (config.json,
tokenizer files, safetensors headers against file lengths), a bounded sample and a cheap count of the
dataset, the MMLU file, the starting adapter, the output folder and the checkpoint it would resume, and
the memory plan against train.max_memory_per_gpu. Each problem is one line naming the file, key or value.
The full per-row validation of the data (and data.strict) happens when the trainer builds the tokenized
cache: still before the model loads, but it reads every row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qlora_dist import atomic, memory, run_plan
from qlora_dist.config import Config, parse_size
from qlora_dist.errors import ConfigError
from qlora_dist.paths import RunPaths


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was found, for `qlora-dist check`
    warnings: list[str] = field(default_factory=list)  # not problems here, but worth saying (a live lock)
    plan: run_plan.RunPlan | None = None
    memory_plan: memory.Plan | None = None
    config: Config | None = None  # the config the run will use: a starting adapter's lora.* values adopted
    ds: dict | None = None  # the DeepSpeed config built from the plan

    @property
    def prepared(self) -> run_plan.PreparedRun:
        """What the trainer is handed (launch/job.py); only for a report without problems."""
        assert not self.problems and self.plan is not None and self.ds is not None
        return run_plan.PreparedRun(self.config, self.plan, self.ds)

    def raise_if_problems(self) -> None:
        """ConfigError with every problem; a memory plan over its cap is printed first, as context."""
        if self.problems:
            if self.memory_plan is not None and not self.memory_plan.fits:
                import sys

                print(memory.format_plan(self.memory_plan), file=sys.stderr, flush=True)
            raise ConfigError(list(dict.fromkeys(self.problems)))  # a problem two checks find, said once

    def format(self) -> str:
        lines = [f"  {note}" for note in self.notes] + [f"  warning: {w}" for w in self.warnings]
        if self.memory_plan is not None:
            lines.append(memory.format_plan(self.memory_plan))
        return "\n".join(["preflight: no problems found", *lines])


def _collect(report: Report, check: Callable[[], list[str] | None]) -> None:
    try:
        report.problems += check() or []
    except ConfigError as exc:
        report.problems += exc.problems


def run(cfg: Config, world_size: int, problems: list[str] = (), cuda: bool | None = None,
        for_train: bool = True) -> Report:
    """All problems of `cfg` on `world_size` ranks, with the config's own (`problems`) first. `cuda`:
    whether the ranks have GPUs (None: as this machine). `for_train`: `train` itself asks (a run writing
    the output folder now is a problem); `check` and `submit` only warn (it may be done by then)."""
    from qlora_dist.model import init_adapter

    report = Report(problems=list(problems))
    if world_size < 1:
        report.problems.append(f"world size: must be at least 1 (got {world_size})")
        return report
    model_ok = not _checked(report, lambda: _model(cfg, report))
    # The batch count is derived from data.max_examples, the mixture's weights and the global batch: when
    # the config already refused one of them, a count from it would be a second, nonsensical line (and a
    # data.dataset the config refused has no entries to read at all).
    if not any(p.startswith("data.dataset") for p in problems):
        counted = not any(p.startswith(COUNT_KEYS) for p in problems)
        _collect(report, lambda: _tokenizer_and_data(cfg, report, counted))
    if model_ok:
        _collect(report, lambda: _chat_template(cfg))
    _collect(report, lambda: _sequence_parallel(cfg, world_size, model_ok))
    _collect(report, lambda: _int8_loader(cfg))
    _collect(report, lambda: _mmlu(cfg, report))
    _collect(report, lambda: _tracking_and_validation(cfg))
    if not _checked(report, lambda: init_adapter.problems(cfg)):
        cfg = init_adapter.adopt(cfg)  # the lora.* values the run will use (the plan and resume check need them)
    report.config = cfg
    _collect(report, lambda: _adapter_init(cfg, model_ok))
    if model_ok:
        _collect(report, lambda: _plan(cfg, world_size, cuda, report))
        _collect(report, lambda: _long_samples(cfg, world_size, report))
    _collect(report, lambda: _ds_config(cfg, world_size, report))
    _collect(report, lambda: _master_weights(cfg, cuda))
    _collect(report, lambda: _output(cfg, report, for_train, world_size))
    return report


def _checked(report: Report, check: Callable[[], list[str] | None]) -> bool:
    """Collect a check's problems; True when it found any."""
    before = len(report.problems)
    _collect(report, check)
    return len(report.problems) > before


# ------------------------------------------------------------------------------------------- checks
def _model(cfg: Config, report: Report) -> list[str]:
    from qlora_dist.model import builtin, folder

    path = cfg.model.path
    if size := builtin.random_size(path):
        report.notes.append(f"model {path}: random weights of the LLaMA-{size.upper()} shape")
        return []
    if builtin.is_builtin(path):
        report.notes.append(f"model {path}: built in (prepared in the cache on first use)")
        return []
    errs = folder.problems(Path(path).expanduser())
    if not errs:
        report.notes.append(f"model {path}: config.json, tokenizer and weight headers OK")
    return errs


COUNT_KEYS = ("data.dataset", "data.max_examples", "train.global_batch_size")


def _tokenizer_and_data(cfg: Config, report: Report, counted: bool = True) -> list[str]:
    from qlora_dist.data import corpus, records

    d = cfg.data
    if d.dataset == "builtin":
        report.notes.append(f"data: built-in tasks {', '.join(d.tasks)} ({d.num_train} training examples each)")
        return []
    errs, usable, entries = [], 0, d.entries()
    for entry in entries:  # one dataset, or each of a mixture's
        source = records.resolve(entry.path, entry.format, entry.key)
        head, count = records.look(source, d.max_row_chars, corpus.DETECT_ROWS)
        first = next((r.data for r in head if isinstance(r.data, dict)), None)
        if first is None:
            why = f" (first: {head[0].where}: {head[0].data})" if head else ""
            errs.append(f"{entry.key}: {source.name}: no readable record among the first {len(head)}{why}"
                        if head else f"{entry.key}: {source.name} is empty: no records")
            continue
        fmt = corpus.format_of(source, first)
        usable += round(entry.weight * (min(count, d.max_examples) if d.max_examples else count))
        weight = f", weight {entry.weight:g}" if entry.weight != 1 else ""
        report.notes.append(f"data {source.name}: format {fmt}, {count:,} records{weight}")
    if counted and not errs and usable < cfg.train.global_batch_size and not d.packing:
        what = source.name if len(entries) == 1 else f"the mixture of {len(entries)} datasets"
        errs.append(f"data.dataset: {what} has {usable:,} records, fewer than one global batch "
                    f"(train.global_batch_size={cfg.train.global_batch_size})")
    return errs


def _chat_template(cfg: Config) -> list[str]:
    """data.chat_template=tokenizer needs a tokenizer that has one (tiny-llama's, e.g., has none)."""
    from qlora_dist.model.base import load_tokenizer

    if cfg.data.chat_template != "tokenizer" or load_tokenizer(cfg.model.path).chat_template:
        return []
    return [f"data.chat_template: 'tokenizer', but the tokenizer of model.path={cfg.model.path} has no chat "
            "template; use data.chat_template=guanaco"]


def _sequence_parallel(cfg: Config, world_size: int, model_ok: bool) -> list[str]:
    """dist.sequence_parallel=N > 1: what Ulysses cannot run (memory.sequence_parallel_problems), and a
    sliding window shorter than a row, which it would lose with the mask it drops."""
    n, keys = cfg.dist.sequence_parallel, f"dist.sequence_parallel={cfg.dist.sequence_parallel}"
    if n == 1 or not model_ok:
        return memory.sequence_parallel_problems(cfg, world_size)
    from qlora_dist.model import builtin

    shape = memory.shape_for(cfg)
    errs = memory.sequence_parallel_problems(cfg, world_size, shape)
    config = (builtin.random_llama_config(size) if (size := builtin.random_size(cfg.model.path))
              else _hf_config(builtin.resolve_model_path(cfg.model.path)))
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    longest = cfg.data.source_max_len + cfg.data.target_max_len
    if window and longest > window and shape.attention != "eager":
        errs.append(f"{keys}: {cfg.model.path} attends within a sliding window of {window} tokens, but rows reach "
                    f"{longest} (data.source_max_len + data.target_max_len) and Ulysses drops the window's mask; "
                    f"keep rows within {window} tokens or set dist.sequence_parallel=1")
    return errs


def _adapter_init(cfg: Config, model_ok: bool) -> list[str]:
    """lora.init (model/adapter_init.py) where it cannot work: each problem names the keys involved."""
    init, errs = cfg.lora.init, []
    if "lora.init_iters" in cfg.user_keys and init != "loftq":
        errs.append(f"lora.init_iters: only lora.init=loftq takes steps (lora.init={init}); drop lora.init_iters")
    if init not in ("loftq", "pissa"):
        return errs
    if init == "loftq" and cfg.quantization.bits == 16:
        errs.append("lora.init=loftq with quantization.bits=16: LoftQ fits the adapter to the 4-bit base's "
                    "quantization error, which a 16-bit base does not have; use quantization.bits=4, or lora.init=pissa")
    if cfg.model.loader == "hf":
        errs.append(f"lora.init={init} with model.loader=hf: the start is computed on each layer's 16-bit weights "
                    "before they are quantized, in our layer-wise loader; use model.loader=auto or layerwise")
    if cfg.lora.variant == "dora":
        errs.append(f"lora.init={init} with lora.variant=dora: DoRA's starting magnitude would be taken before the "
                    "start is placed (not supported here); use lora.variant=lora or lora.init=default")
    if model_ok and (narrow := min(min(a, b) for a, b in memory.shape_for(cfg).linears())) < cfg.lora.r:
        errs.append(f"lora.r={cfg.lora.r} with lora.init={init}: the start takes r singular vectors, but the "
                    f"narrowest linear layer of {cfg.model.path} has {narrow}; use lora.r <= {narrow}")
    return errs


def _int8_loader(cfg: Config) -> list[str]:
    """quantization.bits=8 (LLM.int8) loads through transformers' from_pretrained only: the layer-wise loader
    (ZeRO-3 under model.loader=auto, model.loader=layerwise, random: models) makes NF4/FP4 Linear4bit layers."""
    from qlora_dist.ds_files import read_ds_config, zero_stage
    from qlora_dist.model.base import loads_layerwise

    if cfg.quantization.bits != 8:
        return []
    try:
        stage = zero_stage(read_ds_config(cfg.dist.ds_config)[0])
    except ConfigError:  # reported by the ds_config check
        return []
    if not loads_layerwise(cfg, stage):
        return []
    why = f"dist.ds_config={cfg.dist.ds_config} (ZeRO-3)" if stage == 3 else f"model.loader={cfg.model.loader}"
    if cfg.model.path and str(cfg.model.path).startswith("random:"):
        why = f"model.path={cfg.model.path} (random weights)"
    return [f"quantization.bits: 8 (LLM.int8) loads through transformers' from_pretrained, but {why} uses the "
            "layer-wise loader, which quantizes to 4 bit only; use quantization.bits=4, or dist.ds_config=zero2 "
            "with model.loader=hf"]


def _hf_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def _tracking_and_validation(cfg: Config) -> list[str]:
    from qlora_dist.evaluate import validation
    from qlora_dist.train import trackers

    return trackers.problems(cfg.train.report_to) + validation.problems(cfg)


def _mmlu(cfg: Config, report: Report) -> list[str]:
    from qlora_dist.evaluate import mmlu

    e = cfg.eval
    if not e.mmlu_data:
        return []
    try:
        questions = mmlu.read_questions(e.mmlu_data, e.mmlu_shots, e.mmlu_split, e.mmlu_max_questions)
    except ConfigError as exc:
        return [f"eval.mmlu_data: {p}" for p in exc.problems]
    report.notes.append(f"MMLU {e.mmlu_data}: {len(questions):,} questions")
    return []


def _plan(cfg: Config, world_size: int, cuda: bool | None, report: Report) -> list[str]:
    try:
        report.plan = run_plan.resolve(cfg, world_size, cuda=cuda)
    except ConfigError:
        if cfg.train.max_memory_per_gpu and cfg.train.micro_batch_size == "auto":  # show the smallest plan
            cfg = run_plan.RunPlan(world_size, "bfloat16", "", 1, True, 1).apply(cfg)  # the dtype is not planned
        _memory_plan(cfg, world_size, cuda, report)
        raise
    report.notes.append(f"run plan on {world_size} rank(s): {report.plan.describe()}")
    _memory_plan(report.plan.apply(cfg), world_size, cuda, report)
    return []


# Above this many tokens a row, `check` warns where transformers would build a sequence x sequence attention
# mask (padded micro-batches, packed rows): 8,192 tokens make 67 MB a row in bool, 201 MB with the additive
# copy CPU sdpa makes per call (memory.attention_mask_bytes), and it grows with the square of the length.
MASK_WARN_TOKENS = 8192


def _long_samples(cfg: Config, world_size: int, report: Report) -> list[str]:
    """Where long rows would get an L x L attention mask (memory.attention_mask_bytes): a warning naming the
    way around it (one unpadded row per micro-batch, no packing: sdpa's causal path builds none)."""
    if report.plan is None:
        return []
    resolved = report.plan.apply(cfg)
    try:
        setup = memory.setup_from_config(resolved, world_size, shape=memory.shape_for(resolved), on_gpu=True)
    except ConfigError:  # the DeepSpeed JSON or the model's config: their own checks report it, once
        return []
    length = max(setup.seq_len, resolved.data.pack_length if resolved.data.packing else 0)
    mask = memory.attention_mask_bytes(memory.replace(setup, seq_len=length))
    if mask and length > MASK_WARN_TOKENS:
        why = "packed rows (data.packing)" if resolved.data.packing else f"micro-batches of {setup.micro_batch} padded rows"
        report.warnings.append(
            f"rows of up to {length:,} tokens in {why}: transformers builds a {length:,} x {length:,} attention "
            f"mask ({mask / memory.GB:.2f} GB in the memory plan, growing with the square of the length); above "
            f"{MASK_WARN_TOKENS:,} tokens use train.micro_batch_size=1 and data.packing=false (no mask at all)")
    return []


def _memory_plan(resolved: Config, world_size: int, cuda: bool | None, report: Report) -> None:
    """The per-rank table under the cap (shown by `check`, and by `train` when it does not fit)."""
    if resolved.train.max_memory_per_gpu and resolved.train.micro_batch_size != "auto":
        setup = memory.setup_from_config(resolved, world_size, on_gpu=cuda)
        report.memory_plan = memory.make_plan(setup, parse_size(resolved.train.max_memory_per_gpu))


def _ds_config(cfg: Config, world_size: int, report: Report) -> list[str]:
    from qlora_dist.ds_files import known_ds_configs
    from qlora_dist.train.engine import build_ds_config

    name = cfg.dist.ds_config
    if name not in known_ds_configs() and Path(name).suffix != ".json":
        return [f"dist.ds_config: unknown {name!r}; allowed: {', '.join(known_ds_configs())} or a .json path"]
    if report.plan is None:  # no plan (its problem is reported): check the file alone
        from qlora_dist.ds_files import read_ds_config

        read_ds_config(name)
        return []
    report.ds = build_ds_config(report.plan.apply(cfg), world_size)
    return []


def _master_weights(cfg: Config, cuda: bool | None) -> list[str]:
    """optim.master_weights=paged needs CUDA unified memory and fp32 masters on the GPU to move there."""
    if cfg.optim.master_weights != "paged":
        return []
    import torch

    from qlora_dist.ds_files import read_ds_config, zero_stage

    try:
        ds, source = read_ds_config(cfg.dist.ds_config)
    except ConfigError:  # reported by the ds_config check
        ds, source = {}, cfg.dist.ds_config
    errs = []
    if "offload_optimizer" in ds.get("zero_optimization", {}):
        errs.append(f"optim.master_weights: paged, but {source} offloads the optimizer (offload_optimizer): the fp32 "
                    "masters are already in host memory; use optim.master_weights=gpu or a ds_config without offload")
    elif ds and zero_stage(ds) == 0:
        errs.append(f"optim.master_weights: paged needs ZeRO stage 1, 2 or 3 ({source} has stage 0): only ZeRO "
                    "keeps fp32 master weights to move")
    if not (torch.cuda.is_available() if cuda is None else cuda):
        errs.append("optim.master_weights: paged (unified) memory exists only on CUDA GPUs, and the ranks have "
                    "none; use optim.master_weights=gpu")
    return errs


def _full_layout(cfg: Config, resume: Path, world_size: int) -> str | None:
    """train.method=full resumes on the world size and ZeRO stage it was saved with only (checkpoint.py
    different_layout_for_full says why): refused here, before the model loads."""
    from qlora_dist.ds_files import read_ds_config, zero_stage
    from qlora_dist.train import checkpoint

    if cfg.train.method != "full":
        return None
    progress, stage = checkpoint.read_progress(resume), zero_stage(read_ds_config(cfg.dist.ds_config)[0])
    if (progress.world_size, progress.zero_stage) == (world_size, stage):
        return None
    return checkpoint.different_layout_for_full(resume, progress, world_size, stage)


def _output(cfg: Config, report: Report, for_train: bool, world_size: int) -> list[str]:
    from qlora_dist import writer_lock
    from qlora_dist.train import checkpoint

    errs = atomic.output_problems(cfg.train.output_dir, "train.output_dir", folder=True)
    if cfg.data.cache_dir:
        errs += atomic.output_problems(cfg.data.cache_dir, "data.cache_dir", folder=True)
    if errs:
        return errs
    paths = RunPaths.of(cfg)
    busy, holder = writer_lock.live_holder(paths)
    if busy and for_train:
        return [writer_lock.busy_problem(paths, holder)]
    if busy:
        report.warnings.append(writer_lock.busy_problem(paths, holder) + " (`train` would refuse now)")
    resume, damaged = checkpoint.resume_point(paths, cfg)  # sizes only: the run hashes them
    report.notes += [f"{ckpt.name} is damaged ({why}): the run will set it aside" for ckpt, why in damaged]
    if resume and (problem := _full_layout(cfg, resume, world_size)):
        return [problem]
    report.notes.append(f"output {cfg.train.output_dir}: " + (f"continues from {resume.name}" if resume else "new run"))
    return []
