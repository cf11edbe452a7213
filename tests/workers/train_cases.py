"""Trains several configurations one after another in one process group (imports and DeepSpeed set-up
are paid once per launch), each into OUT/NAME: the final adapter is in OUT/NAME/adapter as usual.

usage: train_cases.py OUT NAME:key=value,key=value ... -- key=value ...   (the keys after -- apply to all)
  copy=FOLDER among a case's keys: FOLDER (a checkpoint of another run, maybe of another launch) is copied
  into OUT/NAME before it trains, as a user who continues a run in a new folder would do.
  worker=MODULE among a case's keys: the case is run by MODULE.run_case(folder, overrides) (a worker of this
  folder, such as zero3_export) instead of a plain training run, so that the cases of several workers
  share one launch.
Rank 0 writes "=== case NAME" to stderr before each case, so a test can tell the cases' messages apart.
"""
from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

from qlora_dist.compat import quiet_known_warnings, set_library_env

CASE_MARK = "=== case "


def for_each_case(argv: list[str], run_one) -> None:
    """Parses `OUT NAME:key=value,... -- key=value ...` and calls run_one(OUT/NAME, overrides) for each case,
    in one process group (the common keys first, then the case's), after copying its copy= folders. Shared
    by the case workers of tests/workers/."""
    from qlora_dist import dist

    # One process group for all the runs: DeepSpeed 0.19.8 keeps the first group in its globals and
    # cannot train in a second one after destroy_process_group.
    shutdown, dist.shutdown = dist.shutdown, lambda: None

    out, rest = Path(argv[0]), argv[1:]
    split = rest.index("--") if "--" in rest else len(rest)
    cases, common = rest[:split], rest[split + 1:]
    if any("copy=" in case for case in cases):
        dist.init()  # the copies are made by rank 0 while the others wait: the group must exist first
    for case in cases:
        name, _, keys = case.partition(":")
        special = ("copy=", "worker=")
        overrides = [k for k in keys.split(",") if k and not k.startswith(special)]
        workers = [k[len("worker="):] for k in keys.split(",") if k.startswith("worker=")]
        for source in (Path(k[len("copy="):]) for k in keys.split(",") if k.startswith("copy=")):
            if dist.is_main():
                shutil.copytree(source, out / name / source.name)
            dist.barrier()
        if dist.is_main():
            print(f"{CASE_MARK}{name}", file=sys.stderr, flush=True)
        runner = importlib.import_module(workers[0]).run_case if workers else run_one
        runner(out / name, [*common, *overrides])
    dist.barrier()
    shutdown()


def run_as_script(run_one) -> None:
    """A case worker's `__main__` (this one's, dora_cases', full_cases', memory_actual's): the libraries'
    environment, the cases of sys.argv in one process group, then a rank's exit."""
    set_library_env()
    quiet_known_warnings()
    for_each_case(sys.argv[1:], run_one)
    from qlora_dist import dist

    dist.leave(0)  # see compat.exit_without_finalization


def train(folder: Path, overrides: list[str]) -> None:
    """A plain training run of one case."""
    from qlora_dist.config import load_config
    from qlora_dist.launch.job import prepare
    from qlora_dist.train.trainer import run

    cfg = load_config(overrides=[*overrides, f"train.output_dir={folder}"])
    run(cfg, prepare(cfg))


if __name__ == "__main__":
    run_as_script(train)
