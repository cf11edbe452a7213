"""`qlora-dist compare GRID.yaml`: one model, one dataset, a grid of methods x seeds trained with the same
steps, tokens and evaluation, one run after another; then a table of the outcomes (mean and min-max over
the seeds) and a PNG of the loss curves.

The grid file (compare/paper.yaml is the shipped example):
    output_dir: runs/compare        each cell trains into OUTPUT/METHOD/seed-S; the table lands in OUTPUT
    seeds: [1, 2, 3]                train.seed of each cell
    world_size: 1                   ranks per cell (torchrun on this machine when > 1)
    common: {key: value, ...}       every cell's config: model, data, steps, evaluation
    methods: {NAME: {key: value}}   what differs between the rows, applied after `common`
    baseline: NAME                  the row each method's step time is divided by (default: the first)

A grid spans as many invocations as it takes: a cell whose folder holds `completed` is read, not rerun; a
cell stopped half-way resumes from its newest checkpoint (the trainer's own resume). Every cell's config is
parsed before the first one trains, so a bad key fails at once, naming the grid file and the method. A
method may not change what is compared (the model, the data, the steps, the batch, the evaluation). A
completed cell whose saved configuration is not the grid's (the grid file was edited since) is an error
naming the cell and the keys, not a row silently mixing two configurations.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from qlora_dist import atomic
from qlora_dist.errors import ConfigError
from qlora_dist.paths import RunPaths

GRID_KEYS = {"output_dir", "seeds", "world_size", "common", "methods", "baseline"}
# What every row of the table must share: a method that sets one of these compares something else.
# What a completed cell's saved configuration may differ in from the grid's without making it another cell:
# where it was written and what only watches or keeps files; anything else (steps, evaluation) changes a figure.
NOT_COMPARED = ("train.output_dir", "data.cache_dir", "train.report_to", "checkpoint.", "model.allow_base_mismatch")
SHARED_PREFIXES = ("model.path", "data.", "eval.", "train.max_steps", "train.global_batch_size", "train.seed",
                   "train.output_dir", "dist.")
TABLE_COLUMNS = [  # (key, header, format)
    ("train_loss", "train loss", "{:.3f}"), ("eval_loss", "val loss", "{:.3f}"),
    ("exact_match", "exact match %", "{:.1f}"), ("peak_gb", "peak GB", "{:.2f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"), ("step_time_ratio", "step time vs {baseline}", "{:.2f}x"),
    ("saved_mb", "saved MB", "{:.2f}")]
LAST_STEPS = 10  # the final train loss: the mean of the last logged steps (one step's loss is one batch's)


@dataclass(frozen=True)
class Cell:
    method: str
    seed: int
    folder: Path
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Grid:
    path: Path
    output_dir: Path
    seeds: tuple[int, ...]
    world_size: int
    cells: tuple[Cell, ...]
    baseline: str = ""  # the method step times are divided by

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(c.method for c in self.cells))


# ------------------------------------------------------------------------------------------ reading
def _pairs(value, where: str, problems: list[str]) -> list[str]:
    """A {key: value} mapping as key=value overrides (YAML scalars written as the CLI reads them)."""
    if value is None:
        return []
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping of config keys to values")
        return []
    def text(v):
        return json.dumps(v) if isinstance(v, (list, dict)) else str(v).lower() if isinstance(v, bool) else str(v)
    return [f"{k}={text(v)}" for k, v in value.items()]


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError([f"{path}: grid file not found"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError([f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML ({exc})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping with {sorted(GRID_KEYS)}"])
    return data


def _seeds(data: dict, path: Path, problems: list[str]) -> tuple[int, ...]:
    seeds = data.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            and len(set(seeds)) == len(seeds)):
        problems.append(f"{path}: seeds: expected a list of distinct integers (got {seeds!r})")
        return ()
    return tuple(seeds)


def read_grid(path: Path | str) -> Grid:
    """The grid file, checked whole: every problem in one error, each naming the file and the key."""
    path = Path(path)
    data = _read_yaml(path)
    problems = [f"{path}: unknown key '{k}' (expected {sorted(GRID_KEYS)})" for k in data if k not in GRID_KEYS]
    seeds = _seeds(data, path, problems)
    world = data.get("world_size", 1)
    if not (isinstance(world, int) and not isinstance(world, bool) and world >= 1):
        problems.append(f"{path}: world_size: expected a positive integer (got {world!r})")
    common = _pairs(data.get("common"), f"{path}: common", problems)
    methods = data.get("methods")
    if not (isinstance(methods, dict) and methods):
        problems.append(f"{path}: methods: expected a mapping of method names to their keys")
        methods = {}
    out = Path(data.get("output_dir") or f"runs/compare-{path.stem}")
    cells = []
    for name, keys in methods.items():
        own = _pairs(keys, f"{path}: methods.{name}", problems)
        problems += [f"{path}: methods.{name}: sets {o.split('=')[0]}, which every method must share (put it under "
                     f"common)" for o in own if o.split("=")[0].startswith(SHARED_PREFIXES)]
        cells += [Cell(str(name), s, out / str(name) / f"seed-{s}",
                       (*common, *own, f"train.seed={s}", f"train.output_dir={out / str(name) / f'seed-{s}'}"))
                  for s in seeds]
    baseline = data.get("baseline", next(iter(methods), ""))
    if methods and baseline not in methods:
        problems.append(f"{path}: baseline: {baseline!r} is not one of the methods ({', '.join(map(str, methods))})")
    if problems:
        raise ConfigError(problems)
    grid = Grid(path, out, seeds, world, tuple(cells), str(baseline))
    _check_cells(grid)
    return grid


def _check_cells(grid: Grid) -> None:
    """Parse every cell's config as `train` would, before anything trains (one seed per method: the
    seeds differ in train.seed alone)."""
    from qlora_dist.run_plan import parse_run_config

    problems = []
    for method in grid.methods:
        cell = next(c for c in grid.cells if c.method == method)
        try:
            _, found = parse_run_config(overrides=list(cell.overrides))
        except ConfigError as exc:
            found = exc.problems
        problems += [f"{grid.path}: methods.{method}: {p}" for p in found]
    if problems:
        raise ConfigError(problems)


# ------------------------------------------------------------------------------------------ running
def _command(cell: Cell, world_size: int) -> list[str]:
    if world_size == 1:
        return [sys.executable, "-m", "qlora_dist", "train", *cell.overrides]
    # --standalone: a rendezvous on this machine at a free port (a grid runs on one machine)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
            "-m", "qlora_dist", "train", *cell.overrides]


def _run_cell(cell: Cell, world_size: int) -> int:
    """Train one cell in its own process (DeepSpeed keeps one process group per process). A stop signal
    sent to compare (Slurm's, a user's kill) is passed on, so the cell saves and stops as a run would."""
    # the cell's stdout (libraries print there) joins its stderr: compare's own stdout is the table alone
    child = subprocess.Popen(_command(cell, world_size), stdout=sys.stderr.fileno())
    previous = {s: signal.signal(s, lambda signum, _frame: child.send_signal(signum))
                for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        return child.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the child too (same process group): let it finish its stop
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stale_cells(grid: Grid) -> list[str]:
    """Completed cells trained with another configuration than the grid's now (its file edited since): one
    line each, naming the cell and the keys. A cell stopped half-way needs no check here: the trainer's
    resume refuses a changed configuration itself (and admits more steps, which a user may add)."""
    from qlora_dist.run_plan import load_run_config
    from qlora_dist.train.checkpoint import config_differences, read_saved_config

    problems = []
    for cell in grid.cells:
        paths = RunPaths(cell.folder)
        if not (paths.completed.is_file() and (saved := paths.checkpoints())):
            continue
        cfg = load_run_config(overrides=list(cell.overrides))
        if diffs := config_differences(read_saved_config(saved[-1]), cfg, ignore=NOT_COMPARED):
            problems.append(f"{grid.path}: methods.{cell.method}, seed {cell.seed}: {cell.folder} was trained with "
                            f"another configuration ({'; '.join(diffs)}); move that folder aside to retrain it")
    return problems


def run_grid(grid: Grid, only: list[str] | None = None) -> dict[str, int]:
    """Train every cell not yet completed, one after another; {method/seed-S: exit code} of those run. A
    stopped cell (exit code >= 128: a signal) ends the grid there, as the stop was meant for all of it."""
    codes = {}
    completed = {c for c in grid.cells if RunPaths(c.folder).completed.is_file()}
    todo = [c for c in grid.cells if (not only or c.method in only) and c not in completed]
    done = len(completed)
    print(f"[qlora-dist] compare {grid.path}: {len(grid.cells)} cells ({len(grid.methods)} methods x "
          f"{len(grid.seeds)} seeds), {done} already completed, {len(todo)} to train", file=sys.stderr, flush=True)
    for i, cell in enumerate(todo, 1):
        print(f"[qlora-dist] compare: cell {i}/{len(todo)}: {cell.method}, seed {cell.seed} -> {cell.folder}",
              file=sys.stderr, flush=True)
        code = codes[f"{cell.method}/seed-{cell.seed}"] = _run_cell(cell, grid.world_size)
        if code >= 128 or code < 0:
            break
    return codes


# ------------------------------------------------------------------------------------------ the table
def _records(folder: Path) -> list[dict]:
    path = RunPaths(folder).metrics
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _last(records: list[dict], event: str) -> dict | None:
    rows = [r for r in records if r.get("event") == event]
    return rows[-1] if rows else None


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6 if folder.is_dir() else math.nan


def cell_outcome(cell: Cell) -> dict | None:
    """The table's figures of one completed cell (None if it has not completed)."""
    if not RunPaths(cell.folder).completed.is_file():
        return None
    records = _records(cell.folder)
    steps = [r for r in records if "loss" in r and r.get("event") is None]
    peak = [r.get("gpu_peak_gb", r.get("rss_peak_gb")) for r in steps]
    validation, held_out = _last(records, "validation"), _last(records, "eval")
    saved = cell.folder / ("model" if (cell.folder / "model").is_dir() else "adapter_model")
    return {
        "train_loss": sum(r["loss"] for r in steps[-LAST_STEPS:]) / max(len(steps[-LAST_STEPS:]), 1),
        "eval_loss": validation["eval_loss"] if validation else math.nan,
        "exact_match": 100 * held_out["builtin"]["mean"]["accuracy"] if held_out else math.nan,
        "peak_gb": max((p for p in peak if p is not None), default=math.nan),
        # the first step pays for warm-up (allocations, one-time kernels): left out of the speed
        "tokens_per_s": (sum(r["tokens"] for r in steps[1:]) / sum(r["step_s"] for r in steps[1:])
                         if len(steps) > 1 else math.nan),
        "saved_mb": _folder_mb(saved),
        "curve": [(r["step"], r["loss"]) for r in steps],
    }


def _spread(values: list[float]) -> dict:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": None, "min": None, "max": None}
    return {"mean": sum(finite) / len(finite), "min": min(finite), "max": max(finite)}


def outcomes_by_method(grid: Grid) -> dict[str, dict[int, dict]]:
    """{method: {seed: cell_outcome}} of the completed cells: each cell's metrics read once, each with its
    step time over the baseline's of the same seed."""
    by_method: dict[str, dict[int, dict]] = {m: {} for m in grid.methods}
    for cell in grid.cells:
        if (outcome := cell_outcome(cell)) is not None:
            by_method[cell.method][cell.seed] = outcome
    _with_step_time_ratios(by_method, grid.baseline)
    return by_method


def _with_step_time_ratios(outcomes: dict[str, dict[int, dict]], baseline: str) -> None:
    """Each cell's step time over the baseline method's of the same seed (every cell trains the same tokens a
    step, so it is the inverse ratio of tokens/s); NaN where the baseline's cell has not completed."""
    base = outcomes.get(baseline, {})
    for done in outcomes.values():
        for seed, o in done.items():
            o["step_time_ratio"] = base[seed]["tokens_per_s"] / o["tokens_per_s"] if seed in base else math.nan


def summarize(outcomes: dict[str, dict[int, dict]]) -> dict:
    """{method: {"seeds": completed seeds, column: {mean, min, max}}} over the completed cells."""
    return {method: {"seeds": sorted(done), **{key: _spread([o[key] for o in done.values()])
                                               for key, _, _ in TABLE_COLUMNS}}
            for method, done in outcomes.items()}


def format_table(grid: Grid, summary: dict) -> str:
    """A Markdown table: mean (min-max) over the completed seeds of each method."""
    def cell(stats: dict, fmt: str) -> str:
        if stats["mean"] is None:
            return "-"
        text = fmt.format(stats["mean"])
        return text if stats["min"] == stats["max"] else f"{text} ({fmt.format(stats['min'])}-{fmt.format(stats['max'])})"
    head = ["method", "seeds", *[h.format(baseline=grid.baseline) for _, h, _ in TABLE_COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in summary.items():
        seeds = f"{len(row['seeds'])}/{len(grid.seeds)}"
        lines.append("| " + " | ".join([method, seeds, *[cell(row[k], f) for k, _, f in TABLE_COLUMNS]]) + " |")
    return "\n".join(lines)


def plot_curves(outcomes: dict[str, dict[int, dict]], png: Path) -> None:
    """Each method's loss curve (the mean over its completed seeds at each step), one colour a method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, done in outcomes.items():
        curves = [o["curve"] for o in done.values()]
        if not curves:
            continue
        by_step: dict[int, list[float]] = {}
        for curve in curves:
            for step, loss in curve:
                by_step.setdefault(step, []).append(loss)
        steps = sorted(by_step)
        ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], label=f"{method} ({len(curves)} seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (mean over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)


def write_results(grid: Grid) -> tuple[str, dict]:
    """OUTPUT/compare.md (the table), compare.json (the figures) and compare.png (the curves)."""
    outcomes = outcomes_by_method(grid)
    summary = summarize(outcomes)
    table = format_table(grid, summary)
    atomic.write_text(grid.output_dir / "compare.md", table + "\n")
    atomic.write_text(grid.output_dir / "compare.json", json.dumps(summary, indent=2) + "\n")
    plot_curves(outcomes, grid.output_dir / "compare.png")
    return table, summary
