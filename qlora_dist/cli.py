"""`qlora-dist` (and `python -m qlora_dist`): the public command line."""
from __future__ import annotations

import argparse
import sys

from qlora_dist.compat import quiet_known_warnings, set_library_env
from qlora_dist.errors import ConfigError, RunFault
from qlora_dist.recipe import LLAMA_SHAPES


def _split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG.yaml] [key=value ...]`: the one argument without '=' is the YAML file."""
    files = [a for a in args if "=" not in a]
    if len(files) > 1:
        raise ConfigError([f"expected at most one config file and key=value overrides, got {files}"])
    return (files[0] if files else None), [a for a in args if "=" in a]


def _cmd_train(ns) -> None:
    from qlora_dist.launch.job import train

    path, overrides = _split_config_args(ns.args)
    train(path, ns.preset, overrides)


def _world_and_cap(ns) -> tuple[int, int | None]:
    """--world-size and --gpu-memory, checked: one line each when wrong."""
    from qlora_dist.config import POSITIVE, parse_size, range_problems

    errs = range_problems([("--world-size", ns.world_size, POSITIVE)])
    cap = None
    if ns.gpu_memory is not None:
        try:
            cap = parse_size(ns.gpu_memory)
        except ValueError as exc:
            errs.append(f"--gpu-memory: {exc}")
    if errs:
        raise ConfigError(errs)
    return ns.world_size, cap


def _cmd_check(ns) -> None:
    """Everything the preflight of `train` checks, without training: the problems (exit 2) or the plan."""
    from qlora_dist import preflight
    from qlora_dist.run_plan import parse_run_config

    world, cap = _world_and_cap(ns)
    path, overrides = _split_config_args(ns.args)
    if ns.gpu_memory:
        overrides = [*overrides, f"train.max_memory_per_gpu={ns.gpu_memory}"]
    cfg, problems = parse_run_config(path, ns.preset, overrides)
    # A cap per GPU plans for GPUs, also when checked from a login node without one.
    cuda = True if cap or cfg.train.max_memory_per_gpu else None
    report = preflight.run(cfg, world, problems, cuda=cuda, for_train=False)
    report.raise_if_problems()
    print(report.format())


def _cmd_compare(ns) -> None:
    """Train the grid's cells not yet completed, then write and print the table (--table: only that)."""
    from qlora_dist.launch import compare

    grid = compare.read_grid(ns.grid)
    unknown = sorted(set(ns.only or ()) - set(grid.methods))
    if unknown:
        raise ConfigError([f"--only: {', '.join(unknown)} not among {grid.path}'s methods ({', '.join(grid.methods)})"])
    if stale := compare.stale_cells(grid):  # before training or a table that would mix two configurations
        raise ConfigError(stale)
    codes = {} if ns.table else compare.run_grid(grid, ns.only)
    table, _ = compare.write_results(grid)
    print(table)
    print(f"[qlora-dist] compare: table in {grid.output_dir / 'compare.md'}, curves in {grid.output_dir / 'compare.png'}",
          file=sys.stderr)
    failed = {cell: code for cell, code in codes.items() if code != 0}
    if failed:
        stopped = [c for c in failed.values() if c >= 128 or c < 0]
        if stopped:
            raise SystemExit(stopped[0] if stopped[0] >= 128 else 128 - stopped[0])
        raise RunFault("compare: cells failed: " + ", ".join(f"{c} (exit {code})" for c, code in failed.items())
                       + "; their folders keep what they wrote, a rerun continues them")


def _cmd_presets(ns) -> None:
    from qlora_dist.recipe import format_table

    print(format_table())


def _cmd_prepare_model(ns) -> None:
    from qlora_dist.model.builtin import builtin_names, ensure_builtin, is_builtin

    from pathlib import Path

    from qlora_dist import atomic

    problems = [] if is_builtin(ns.name) else [  # (an unknown tiny:<family> is refused in is_builtin)
        f"prepare-model: {ns.name!r} is not a built-in model; built-ins: " + ", ".join(builtin_names())]
    if not (Path(ns.out) / "config.json").is_file():  # a folder made before is kept as it is
        problems += atomic.output_problems(ns.out, "--out", folder=True, empty=True)
    if problems:
        raise ConfigError(problems)
    print(ensure_builtin(ns.name, ns.out))


def _cmd_plan(ns) -> None:
    import json

    from qlora_dist import memory
    from qlora_dist.run_plan import load_run_config

    world, cap = _world_and_cap(ns)
    host_cap = _host_cap(ns, cap)
    path, overrides = _split_config_args(ns.args)
    size = (ns.shape or (ns.preset or "").split("-")[0]) or None
    from qlora_dist.recipe import DATASET_PRESETS

    if ns.preset in DATASET_PRESETS:
        size = None  # a dataset alone: the size class comes from model.path (memory.sized_preset)
    if size and not any(o.startswith("model.path=") for o in overrides):
        overrides = [f"model.path=llama-{size}", *overrides]  # the shape alone: no weights are read
    if ns.gpu_memory:
        overrides = [*overrides, f"train.max_memory_per_gpu={ns.gpu_memory}"]
    cfg = load_run_config(path, ns.preset, overrides)
    shape = memory.Shape.llama(size) if ns.shape else None
    if cfg.train.micro_batch_size == "auto":  # what `train` would pick under the cap (the smallest if none fits)
        setup = memory.choose_micro_batch(cfg, world, cap, shape, on_gpu=True) or memory.setup_from_config(
            cfg, world, shape, micro_batch=1, checkpointing=True, on_gpu=True)
    else:
        setup = memory.setup_from_config(cfg, world, shape, on_gpu=True)
    if problems := memory.sequence_parallel_problems(cfg, world, setup.shape):
        raise ConfigError(problems)
    if ns.max_seq:
        return _print_longest(ns, memory, setup, cap, host_cap, world)
    plan = memory.make_plan(setup, cap)
    fix = memory.suggest(plan.setup, cap) if cap and not plan.fits else None
    if ns.json:
        print(json.dumps({**plan.to_json(), "suggestion": fix}, indent=2))
        return
    print(memory.format_plan(plan))
    if fix:
        print("  to fit: " + "; then ".join(fix))


def _host_cap(ns, cap: int | None) -> int | None:
    """--host-memory, checked; --max-seq needs --gpu-memory (the cap it fills)."""
    from qlora_dist.config import parse_size

    errs, host = [], None
    if ns.host_memory is not None:
        try:
            host = parse_size(ns.host_memory)
        except ValueError as exc:
            errs.append(f"--host-memory: {exc}")
    if ns.max_seq and cap is None:
        errs.append("--max-seq: needs --gpu-memory (the GPU cap the longest sample must fit)")
    if errs:
        raise ConfigError(errs)
    return host


def _print_longest(ns, memory, setup, cap: int, host_cap: int | None, world: int) -> None:
    """plan --max-seq: the longest sample under both caps (the ranks of one machine share its host memory)."""
    import json

    found = memory.longest_sample(setup, cap, host_cap, ranks_per_host=min(world, 8))
    further = memory.longer_sample_changes(setup, cap, host_cap, ranks_per_host=min(world, 8))
    if ns.json:
        at = memory.make_plan(memory.replace(setup, micro_batch=1, seq_len=max(found["max_seq_len"], 1)), cap)
        print(json.dumps({**found, "further": further, "plan_at_max_seq_len": at.to_json()}, indent=2))
        return
    print(memory.format_longest(found, setup, further))


def _cmd_launch_plan(ns) -> None:
    import shlex

    from qlora_dist.dist import planned_ranks

    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    ranks = planned_ranks()
    print(f"rendezvous: {ranks[0]['MASTER_ADDR']}:{ranks[0]['MASTER_PORT']}, {len(ranks)} ranks")
    for r in ranks:
        env = " ".join(f"{k}={r[k]}" for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
        print(f"{r['host']}: {env} {shlex.join(command)}")


def _cmd_submit(ns) -> None:
    from qlora_dist.launch.submit import submit

    path, overrides = _split_config_args(ns.args)
    job = submit(ns, overrides, path)
    print(f"submitted job {job.job_id} ({job.paths.folder})", flush=True)
    if ns.wait:
        job.results()  # one result per task; raises with the job's error if a task failed
        print(f"job {job.job_id} finished")


def _join_ranks():
    """torchrun / deepspeed ranks join the process group; a plain process is a world of one without one
    (and without importing deepspeed)."""
    import contextlib
    import os

    from qlora_dist import dist

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return dist.read_env()
    # deepspeed 0.19.8 prints "... deepspeed_shm_comm_op built successfully" to stdout on CPU: keep
    # stdout for results (`--json`).
    with contextlib.redirect_stdout(sys.stderr):
        return dist.init()


def _inference_problems(ns, ranges: list) -> list[str]:
    """Every problem of generate's and eval's shared options, found before a weight is read: the ranges
    (config.py's checkers, the same as the config keys'), the base folder, and the adapter's (whole, and
    trained on this base: model/adapter_settings.base_problems)."""
    from qlora_dist.config import range_problems
    from qlora_dist.model import builtin, folder
    from qlora_dist.model.base import adapter_problems

    problems = range_problems(ranges)
    base = builtin.resolve_model_path(ns.base)
    if not builtin.random_size(ns.base) and (base_errs := folder.problems(base, "--base")):
        return problems + base_errs
    if ns.adapter:
        problems += adapter_problems(ns.adapter, ns.base, allow_mismatch=ns.allow_base_mismatch)
    return problems


def _collected(problems: list[str], read):
    """read()'s result, with its ConfigError's problems added to `problems` (None then)."""
    try:
        return read()
    except ConfigError as exc:
        problems += exc.problems
        return None


def _positions_problems(ns, tokenizer, template: str, first_turns: list[str]) -> list[str]:
    """--max-new-tokens past the base's positions (config.json's max_position_embeddings) would generate
    garbage with only a transformers warning: the longest prompt plus the new tokens must fit."""
    from qlora_dist.data.prompts import chat_prompt
    from qlora_dist.model import builtin, folder

    positions = folder.max_positions(builtin.resolve_model_path(ns.base))
    if positions is None:
        return []
    longest = max(len(tokenizer(chat_prompt(template, tokenizer, [t], []), add_special_tokens=False)["input_ids"]) + 1
                  for t in first_turns)  # + BOS, as generate_texts encodes them
    if longest + ns.max_new_tokens <= positions:
        return []
    return [f"--max-new-tokens: {ns.max_new_tokens} new tokens after the longest prompt's {longest} do not fit the "
            f"{positions} positions of {ns.base} (max_position_embeddings); at most {max(positions - longest, 0)}"]


def _cmd_generate(ns) -> None:
    from pathlib import Path

    from qlora_dist import atomic
    from qlora_dist.config import POSITIVE, SEED, TEMPERATURE, TOP_P
    from qlora_dist.evaluate.generate import (answer, answer_questions, answer_records, chat_template_of,
                                              load_for_inference, write_jsonl)
    from qlora_dist.evaluate.bench_files import read_prompt_file
    from qlora_dist import dist
    from qlora_dist.model.base import load_tokenizer

    problems = _inference_problems(ns, [
        ("--max-new-tokens", ns.max_new_tokens, POSITIVE), ("--temperature", ns.temperature, TEMPERATURE),
        ("--top-p", ns.top_p, TOP_P), ("--batch-size", ns.batch_size, POSITIVE), ("--seed", ns.seed, SEED)])
    read = None
    if ns.prompts is not None:  # the answer file is checked before the work, not at the write after it
        problems += atomic.output_problems(ns.out, "--out") if ns.out else [
            "--out: required with --prompts (the answer file to write)"]
        read = _collected(problems, lambda: read_prompt_file(ns.prompts))
    if problems:
        raise ConfigError(problems)
    tokenizer = load_tokenizer(ns.base)
    template = chat_template_of(ns.adapter, ns.chat_template, tokenizer, ns.base)  # before the model
    first_turns = [ns.prompt] if read is None else [q.turns[0] for q in read[1]]
    if problems := _positions_problems(ns, tokenizer, template, first_turns):
        raise ConfigError(problems)
    loading = dict(bits=ns.bits, compute_dtype=ns.compute_dtype, allow_base_mismatch=ns.allow_base_mismatch,
                   tokenizer=tokenizer)  # loaded once, above
    if ns.prompt is not None:
        model, tokenizer = load_for_inference(ns.base, ns.adapter, **loading)
        print(answer(model, tokenizer, ns.prompt, ns.max_new_tokens, ns.temperature, ns.top_p, template))
        return
    schema, questions = read
    info = _join_ranks()
    try:
        import torch

        torch.manual_seed(ns.seed + info.rank)  # sampling only; greedy answers do not depend on it
        model, tokenizer = load_for_inference(ns.base, ns.adapter, **loading)
        answers = answer_questions(model, tokenizer, questions, ns.max_new_tokens, ns.temperature, ns.top_p,
                                   ns.batch_size, info.rank, info.world_size, template)
        if info.is_main:
            model_id = ns.model_id or Path(ns.adapter or ns.base).name
            write_jsonl(Path(ns.out), answer_records(schema, questions, answers, model_id))
            dist.log(f"{len(questions)} answers ({schema} schema) written to {ns.out}")
        dist.barrier()  # leave together (see dist.barrier)
    finally:
        dist.shutdown()


def _cmd_eval_mmlu(ns) -> None:
    import json
    import time

    from qlora_dist.config import COUNT, POSITIVE
    from qlora_dist.evaluate import mmlu
    from qlora_dist.evaluate.generate import load_for_inference
    from qlora_dist import dist

    problems = _inference_problems(ns, [("--batch-size", ns.batch_size, POSITIVE),
                                        ("--max-questions", ns.max_questions, COUNT)])
    # before the model loads (a bad --max-questions is reported above, so read them all then)
    questions = _collected(problems, lambda: mmlu.read_questions(ns.data, ns.shots, ns.split,
                                                                 max(ns.max_questions, 0)))
    if problems:
        raise ConfigError(problems)
    info = _join_ranks()
    try:
        model, tokenizer = load_for_inference(ns.base, ns.adapter, ns.bits, ns.compute_dtype,
                                              allow_base_mismatch=ns.allow_base_mismatch)
        start = time.perf_counter()
        report = mmlu.evaluate(model, tokenizer, questions, ns.batch_size, info.rank, info.world_size)
        report.update(world_size=info.world_size, seconds=round(time.perf_counter() - start, 2))
        if info.is_main:
            title = (f"MMLU {ns.data} ({len(questions)} questions, {info.world_size} rank(s), "
                     f"{report['seconds']:.1f} s):")
            print(json.dumps(report) if ns.json else mmlu.format_report(report, title), flush=True)
        dist.barrier()  # leave together (see dist.barrier)
    finally:
        dist.shutdown()


def _cmd_eval_vicuna(ns) -> None:
    from pathlib import Path

    from qlora_dist import atomic, dist
    from qlora_dist.config import POSITIVE, SEED, TEMPERATURE, TOP_P
    from qlora_dist.evaluate import vicuna
    from qlora_dist.evaluate.bench_files import read_prompt_file
    from qlora_dist.evaluate.generate import chat_template_of, load_for_inference
    from qlora_dist.model.base import load_tokenizer

    problems = _inference_problems(ns, [
        ("--max-new-tokens", ns.max_new_tokens, POSITIVE), ("--temperature", ns.temperature, TEMPERATURE),
        ("--top-p", ns.top_p, TOP_P), ("--batch-size", ns.batch_size, POSITIVE), ("--seed", ns.seed, SEED)])
    problems += atomic.output_problems(ns.out, "--out")  # an existing file is continued, not refused
    read = _collected(problems, lambda: read_prompt_file(ns.questions, "--questions"))
    if problems:
        raise ConfigError(problems)
    schema, questions = read
    tokenizer = load_tokenizer(ns.base)
    template = chat_template_of(ns.adapter, ns.chat_template, tokenizer, ns.base)  # before the model
    if problems := _positions_problems(ns, tokenizer, template, [q.turns[0] for q in questions]):
        raise ConfigError(problems)
    out = Path(ns.out)
    written = vicuna.read_written(out, questions)  # every rank: a wrong file is refused by all, before joining
    info = _join_ranks()
    try:
        written = dist.broadcast_object(written)  # rank 0's file is the record (a node may not share its disk)
        if len(written) < len(questions):
            dist.log(f"{len(written)} of {len(questions)} answers already in {out}; answering the rest")
            model, tokenizer = load_for_inference(ns.base, ns.adapter, ns.bits, ns.compute_dtype,
                                                  allow_base_mismatch=ns.allow_base_mismatch, tokenizer=tokenizer)
            sampling = vicuna.Sampling(ns.seed, ns.batch_size, ns.max_new_tokens, ns.temperature, ns.top_p, template)
            model_id = ns.model_id or Path(ns.adapter or ns.base).name
            added = vicuna.answer_missing(model, tokenizer, questions, schema, written, sampling, out, model_id, info)
            dist.log(f"{added} answers generated; {len(questions)} answers ({schema} schema) in {out}")
        else:
            dist.log(f"all {len(questions)} answers are already in {out}; nothing to generate")
        dist.barrier()  # leave together (see dist.barrier)
    finally:
        dist.shutdown()


def _cmd_eval_judge(ns) -> None:
    from pathlib import Path

    from qlora_dist import atomic
    from qlora_dist.config import COUNT, POSITIVE, range_problems
    from qlora_dist.evaluate import bench_files, chatbot_score, judge
    from qlora_dist.evaluate.bench_files import read_prompt_file

    problems = range_problems([("--workers", ns.workers, POSITIVE), ("--requests-per-minute", ns.requests_per_minute,
                                                                       COUNT), ("--max-retries", ns.max_retries, COUNT)])
    problems += atomic.output_problems(ns.out, "--out", folder=True)  # a folder with reviews is continued
    read = _collected(problems, lambda: read_prompt_file(ns.questions, "--questions"))
    ids = [q.question_id for q in read[1]] if read else None
    answers = _collected(problems, lambda: bench_files.read_answers(ns.answers, "--answers", ids))
    reference = _collected(problems, lambda: bench_files.read_answers(ns.reference, "--reference", ids,
                                                                                    others_ok=True))
    prompts = _collected(problems, lambda: bench_files.read_judge_prompts(ns.prompts))
    client = _collected(problems, lambda: judge.make_client(ns.max_retries))
    if problems:
        raise ConfigError(problems)
    requests = judge.build_requests(read[1], answers, reference, prompts)
    print(f"{len(requests)} reviews by {ns.judge_model} ({len(read[1])} questions x 2 orders)", file=sys.stderr)
    files, asked = judge.run_judge(requests, ns.judge_model, Path(ns.out), client, ns.workers, ns.requests_per_minute)
    name = ns.name or Path(ns.answers).stem
    rows = chatbot_score.score_systems([(name, path) for path in files.values()], reference)
    report = chatbot_score.write_report(Path(ns.out), rows)
    print(f"{asked} requests asked now, {len(requests) - asked} from the cache; reviews: "
          f"{', '.join(str(p) for p in files.values())}; report: {report[0]}, {report[2]}", file=sys.stderr)
    print(chatbot_score.format_scores(rows))


def _named_files(pairs: list[str], option: str) -> list[tuple]:
    """NAME=FILE arguments as (name, path)."""
    from pathlib import Path

    bad = [p for p in pairs if "=" not in p or not p.split("=", 1)[0] or not p.split("=", 1)[1]]
    if bad:
        raise ConfigError([f"{option}: {bad[0]!r} is not NAME=FILE"])
    return [(p.split("=", 1)[0], Path(p.split("=", 1)[1])) for p in pairs]


def _cmd_eval_score(ns) -> None:
    import json
    from pathlib import Path

    from qlora_dist import atomic
    from qlora_dist.evaluate import bench_files, chatbot_score

    from qlora_dist.config import SEED, range_problems

    reviews = _named_files(ns.reviews, "--reviews")
    problems = range_problems([("--seed", ns.seed, SEED)])
    if ns.report:
        problems += atomic.output_problems(ns.report, "--report", folder=True)
    if problems:
        raise ConfigError(problems)
    reference = bench_files.read_answers(ns.reference, "--reference")
    rows = chatbot_score.score_systems(reviews, reference, ns.seed)
    if ns.report:
        chatbot_score.write_report(Path(ns.report), rows)
    print(json.dumps(rows) if ns.json else chatbot_score.format_scores(rows))


def _cmd_eval_elo(ns) -> None:
    import json

    from qlora_dist.config import POSITIVE, SEED, range_problems
    from qlora_dist.evaluate import chatbot_score

    if problems := range_problems([("--orderings", ns.orderings, POSITIVE), ("--seed", ns.seed, SEED)]):
        raise ConfigError(problems)
    matches = chatbot_score.read_tournament(ns.pairwise)
    ratings = chatbot_score.elo(matches, ns.orderings, ns.seed)
    rows = chatbot_score.elo_table(matches, ratings)
    print(json.dumps(rows) if ns.json else chatbot_score.format_elo(rows, matches, ns.orderings))


def _cmd_verify(ns) -> None:
    from pathlib import Path

    from qlora_dist.train.checkpoint import verify_folder

    rows = verify_folder(Path(ns.output_dir))
    for name, _, verdict in rows:
        print(f"{name}: {verdict}")
    if not rows:
        print(f"{ns.output_dir}: no checkpoints")
    if not all(ok for _, ok, _ in rows):
        raise SystemExit(1)


def _cmd_merge(ns) -> None:
    from qlora_dist.model.merge import merge

    print(merge(ns.base, ns.adapter, ns.out, ns.dtype, ns.compute_dtype, ns.allow_base_mismatch))


def _cmd_convert_pissa(ns) -> None:
    from qlora_dist.model.pissa_lora import convert

    print(convert(ns.base, ns.adapter, ns.out, ns.compute_dtype))


def _cmd_data_preview(ns) -> None:
    from qlora_dist.run_plan import load_run_config
    from qlora_dist.data.corpus import preview
    from qlora_dist.model.base import load_tokenizer
    from qlora_dist.model.builtin import resolve_model_path

    path, overrides = _split_config_args(ns.args)
    from qlora_dist.config import POSITIVE, range_problems

    if problems := range_problems([("--n", ns.n, POSITIVE)]):
        raise ConfigError(problems)
    cfg = load_run_config(path, ns.preset, [f"data.dataset={ns.dataset}", *overrides])
    print(preview(cfg, load_tokenizer(resolve_model_path(cfg.model.path)), ns.n))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-dist", description="Distributed QLoRA fine-tuning on DeepSpeed")
    # The `deepspeed` launcher puts --local_rank=N before the subcommand; LOCAL_RANK carries the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    _add_training_commands(sub)
    _add_cluster_commands(sub)
    _add_data_and_model_commands(sub)
    return parser


def _add_training_commands(sub) -> None:
    p = sub.add_parser("train", help="fine-tune (continues from the newest checkpoint in train.output_dir)")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]",
                   help="a YAML config and/or overrides such as train.max_steps=100")
    p.add_argument("--preset", help="a recipe preset (see `qlora-dist presets`)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by `deepspeed`
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("check", help="check a run without reading a weight: config, DeepSpeed JSON, model folder, "
                                     "data, MMLU file, starting adapter, output folder, memory plan")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]")
    p.add_argument("--preset", help="a recipe preset (see `qlora-dist presets`)")
    p.add_argument("--world-size", type=int, default=1, help="ranks of the run (default 1)")
    p.add_argument("--gpu-memory", help="cap per GPU, e.g. 24GB or 40GiB (sets train.max_memory_per_gpu)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("verify", help="check an output folder's checkpoints and final adapter (sizes, sha256 "
                                      "against each checkpoint's manifest, finite values)",
                       description="One line per checkpoint (ok / damaged: file, why / non-finite: tensor), then "
                                   "the final adapter. Exit status: 0 all intact, 1 something damaged, 2 not a folder.")
    p.add_argument("output_dir", metavar="OUTPUT_DIR")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("compare", help="train a grid of methods x seeds on one model and dataset (one run after "
                       "another, resumable), then a table of mean and min-max over seeds and a PNG of the curves")
    p.add_argument("grid", metavar="GRID.yaml", help="the grid file (see compare/paper.yaml)")
    p.add_argument("--only", nargs="+", metavar="METHOD", help="train only these methods' cells (the table has all)")
    p.add_argument("--table", action="store_true", help="train nothing: the table of the cells completed so far")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("presets", help="print the QLoRA recipe presets")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("prepare-model", help="write a built-in model as a Hugging Face folder")
    # Checked when run (model/builtin.py builtin_names), so that building the parser imports no torch.
    p.add_argument("name", metavar="NAME", help="smollm2, tiny-llama or tiny:<family> (tiny:llama3, tiny:qwen2, ...)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_prepare_model)

    p = sub.add_parser("plan", help="per-rank GPU memory plan of a run, and whether it fits a cap")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]")
    p.add_argument("--preset", help="a recipe preset; a paper preset alone gives the LLaMA shape")
    p.add_argument("--shape", choices=list(LLAMA_SHAPES), help="plan this LLaMA shape (recipe.LLAMA_SHAPES)")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--gpu-memory", help="cap per GPU, e.g. 24GB or 40GiB")
    p.add_argument("--host-memory", help="host RAM of a machine, shared by its ranks (with --max-seq), e.g. 512GB")
    p.add_argument("--max-seq", action="store_true", help="the longest sample (micro batch 1) that fits the GPU "
                                                          "cap and the host cap, and which binds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plan)


def _add_cluster_commands(sub) -> None:
    p = sub.add_parser("submit", help="submit a training run with submitit (Slurm, or this machine)")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]")
    p.add_argument("--preset")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="one rank per GPU")
    p.add_argument("--tasks-per-node", type=int, help="ranks per node (default: --gpus-per-node, or 1)")
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--cluster", choices=["auto", "slurm", "local"], default="auto", help="auto: slurm if present")
    p.add_argument("--partition")
    p.add_argument("--timeout-min", type=int, default=24 * 60)
    p.add_argument("--signal-delay-s", type=int, default=120, help="warning before the time limit")
    p.add_argument("--wait", action="store_true", help="wait for the job and fail if it fails")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("launch-plan", help="print each rank's command and rendezvous for this Slurm job "
                                           "(what slurm/*.sh do with DRY_RUN=1)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_launch_plan)


def _add_data_and_model_commands(sub) -> None:
    from qlora_dist.precision import COMPUTE_DTYPES

    # The same choice as training (model.compute_dtype): the machine's, not the adapter's.
    auto_help = ("auto: bfloat16 on CUDA and on CPUs with native bf16 (avx512_bf16/amx_bf16), else float32 "
                 "($QLORA_DIST_COMPUTE_DTYPE overrides auto)")
    dtype_help = f"dtype the base's matmuls run in; {auto_help}"
    bits_help = "override the base's bits (default: the adapter's qlora_dist.json, else 4)"
    mismatch_help = ("apply the adapter although it records another base (model type, config.json or layer "
                     "shapes); by default that is an error")
    p = sub.add_parser("data", help="inspect a dataset before training on it")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("preview", help="the first rows as the model sees them, token counts, skip counts")
    p.add_argument("dataset", help="a dataset name, file or folder (data.dataset)")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]", help="e.g. data.format=chip2")
    p.add_argument("--preset", help="a recipe preset (its lengths and model)")
    p.add_argument("--n", type=int, default=3, help="examples to show")
    p.set_defaults(func=_cmd_data_preview)

    p = sub.add_parser("generate", help="answer a prompt in the Guanaco format (or the adapter's chat template)")
    _add_model_args(p, mismatch_help, bits_help, dtype_help, chat_template=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="one prompt: its answer is printed")
    which.add_argument("--prompts", help="a FastChat question.jsonl (llm_judge `turns` or eval-table `text` "
                                         "schema): answers go to --out in the matching answer schema")
    p.add_argument("--out", help="with --prompts: the answer .jsonl to write")
    p.add_argument("--model-id", help="model_id in the answer file (default: the adapter's or base's folder name)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="sampling seed, 0 to 2^32-1 (rank r uses seed + r)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; with --temperature > 0")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("eval", help="evaluate a base (and adapter) on a benchmark")
    eval_sub = p.add_subparsers(dest="eval_command", required=True)
    p = eval_sub.add_parser("mmlu", help="MMLU accuracy per subject and mean (runs under torchrun too)")
    _add_model_args(p, mismatch_help, bits_help, dtype_help, chat_template=False)
    p.add_argument("--data", required=True, help="a hendrycks MMLU folder (dev/ val/ test/ CSVs) or a JSON-lines "
                                                 "file like qlora's data/mmlu/zero_shot_mmlu_val.json")
    p.add_argument("--shots", type=int, choices=[0, 5], default=5, help="hendrycks folder only")
    p.add_argument("--split", choices=["val", "test"], default="val", help="hendrycks folder only")
    p.add_argument("--max-questions", type=int, default=0, help="evenly spaced subset (0: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="the whole report, predictions included, as JSON")
    p.set_defaults(func=_cmd_eval_mmlu)

    _add_chatbot_commands(eval_sub, mismatch_help, bits_help, dtype_help)

    p = sub.add_parser("merge", help="merge an adapter into the dequantized NF4 base: a plain 16-bit HF folder")
    p.add_argument("--base", required=True, help="HF folder, or smollm2 / tiny-llama")
    p.add_argument("--adapter", required=True)
    p.add_argument("--allow-base-mismatch", action="store_true", help=mismatch_help)
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="dtype of the merged weights")
    p.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="auto",
                   help=f"dtype the quantized base is loaded and dequantized in; {auto_help}")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("convert-pissa", help="a PiSSA adapter (lora.init=pissa) as a plain LoRA of the original "
                                             "base, r doubled: exact on a 16-bit base, approximate on NF4 (README)")
    p.add_argument("--base", required=True, help="HF folder, or smollm2 / tiny-llama")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="float32",
                   help="dtype the residual base is rebuilt in to recompute PiSSA's start")
    p.set_defaults(func=_cmd_convert_pissa)


def _add_model_args(p, mismatch_help: str, bits_help: str, dtype_help: str, chat_template: bool) -> None:
    """The options of every command that loads a base and an adapter to run them (generate, eval)."""
    from qlora_dist.precision import COMPUTE_DTYPES

    p.add_argument("--base", required=True, help="HF folder, or smollm2 / tiny-llama")
    p.add_argument("--adapter", help="a PEFT adapter folder, e.g. OUTPUT/adapter_model")
    p.add_argument("--allow-base-mismatch", action="store_true", help=mismatch_help)
    if chat_template:
        p.add_argument("--chat-template", choices=("guanaco", "tokenizer"),
                       help="prompt format (default: the adapter's data.chat_template, else guanaco)")
    p.add_argument("--bits", type=int, choices=[4, 8, 16], help=bits_help)
    p.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="auto", help=dtype_help)


def _add_chatbot_commands(eval_sub, mismatch_help: str, bits_help: str, dtype_help: str) -> None:
    """The paper's chatbot benchmark: answers (vicuna), a judge relative to ChatGPT, the score, Elo."""
    from pathlib import Path


    bench = Path(__file__).parent / "evaluate" / "vicuna_bench"  # the questions and the authors' judge prompts
    p = eval_sub.add_parser("vicuna", help="answer the Vicuna benchmark's 80 questions (runs under torchrun; resumable)")
    _add_model_args(p, mismatch_help, bits_help, dtype_help, chat_template=True)
    p.add_argument("--questions", default=str(bench / "question.jsonl"),
                   help="a FastChat question.jsonl, either schema (default: the 80 Vicuna questions)")
    p.add_argument("--out", required=True, help="the answer .jsonl (FastChat's schema); an existing one is continued")
    p.add_argument("--model-id", help="model_id in the answers (default: the adapter's or base's folder name)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per batch; answers depend on it, not on ranks")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, 0 to 2^32-1 (each batch derives its own)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.7, help="the paper's 0.7; 0: greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="the paper's 0.9")
    p.set_defaults(func=_cmd_eval_vicuna)

    p = eval_sub.add_parser("judge", help="a judge's 10-point reviews of answers against ChatGPT's, in both orders "
                                          "(an OpenAI-compatible endpoint: OPENAI_BASE_URL, OPENAI_API_KEY)")
    p.add_argument("--questions", default=str(bench / "question.jsonl"), help="default: the 80 Vicuna questions")
    p.add_argument("--answers", required=True, help="the system's answers (eval vicuna --out)")
    p.add_argument("--reference", required=True, help="ChatGPT's answers, e.g. the authors' answer_gpt35.jsonl")
    p.add_argument("--judge-model", required=True, help="the endpoint's model name, e.g. gpt-4")
    p.add_argument("--out", required=True, help="folder for the reviews (chatgpt_first.jsonl, system_first.jsonl), "
                                                "their cache and the report")
    p.add_argument("--name", help="the system's name in the report (default: the answer file's stem)")
    p.add_argument("--prompts", default=str(bench), help="folder with reviewer.jsonl and vicuna_prompt_relative.jsonl "
                                                         "(default: the authors')")
    p.add_argument("--workers", type=int, default=4, help="requests in flight at once")
    p.add_argument("--requests-per-minute", type=float, default=60, help="0: no limit")
    p.add_argument("--max-retries", type=int, default=6, help="retries of a 429 / 5xx / dropped request, with backoff")
    p.set_defaults(func=_cmd_eval_judge)

    p = eval_sub.add_parser("score", help="score relative to ChatGPT per system and order, their mean and a 95% CI")
    p.add_argument("--reference", required=True, help="ChatGPT's answers (their ids tell each review's order)")
    p.add_argument("--reviews", nargs="+", required=True, metavar="NAME=FILE",
                   help="relative review files; a NAME given twice pools its files (its two orders)")
    p.add_argument("--report", help="also write the table and a bar plot (PNG) into this folder")
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval_score)

    p = eval_sub.add_parser("elo", help="Elo of the systems of a three-class pairwise tournament")
    p.add_argument("--pairwise", required=True, nargs="+", metavar="PATH",
                   help="A-vs-B-<judge>-reviewer-threeclass.jsonl files, or folders of them")
    p.add_argument("--orderings", type=int, default=10_000, help="random orders of the matches averaged")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval_elo)


def main(argv: list[str] | None = None) -> int:
    set_library_env()
    quiet_known_warnings()
    ns = build_parser().parse_args(argv)
    try:
        ns.func(ns)
        code = 0
    except ConfigError as exc:
        _report(exc)
        code = 2
    except RunFault as exc:
        _report_fault(exc)
        code = RunFault.EXIT_CODE
    except SystemExit as exc:  # a stop after a signal (train/preempt.py): 128 + its number
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    from qlora_dist import dist

    return dist.leave(code)


def _report(exc: ConfigError) -> None:
    """One line per problem, no traceback. Under a launcher every rank finds the same problems: rank 0
    says them (a rank-specific failure is not a ConfigError and keeps its traceback)."""
    import os

    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        for problem in exc.problems:
            print(f"qlora-dist: error: {problem}", file=sys.stderr)


def _report_fault(exc: RunFault) -> None:
    from qlora_dist import dist

    me = dist.launcher_env()  # torchrun's, deepspeed's or srun's description of this rank
    print(f"qlora-dist: {'' if me.world_size == 1 else f'rank {me.rank}: '}error: {exc}", file=sys.stderr)
