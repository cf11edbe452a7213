"""Signals landed in each phase of real training runs, one process for all of them (imports and DeepSpeed
set-up paid once; one shared process group). For each case: run with the test hook
QLORA_DIST_TEST_SIGNAL_AT set, catch the exit, and (where a checkpoint was written) run again without it, as
a requeue would. Writes OUT/rank-<r>.json: {case: {"code": exit code, "resumed": True if rerun}}.

usage: preempt_cases.py OUT [--then-rank1-alone-at-data] CASE=SPEC[@resume] ... -- key=value ...
  CASE=-          an uninterrupted run (the reference)
  CASE=SPEC       QLORA_DIST_TEST_SIGNAL_AT=SPEC; "@resume": then rerun to the end
  a key=value after the CASE (CASE=SPEC,key=value) applies to that case only
--then-rank1-alone-at-data: last, SIGTERM to rank 1 alone while it prepares the data, not caught: how
  the launcher ends the job when one rank leaves at once (immediate mode) and the other waits on it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from qlora_dist.compat import quiet_known_warnings, set_library_env


def main(argv: list[str]) -> None:
    set_library_env()
    quiet_known_warnings()
    from qlora_dist.config import load_config
    from qlora_dist import dist
    from qlora_dist.train.preempt import SIGNAL_AT_ENV
    from qlora_dist.launch.job import prepare
    from qlora_dist.train.trainer import run

    # One process group for all the runs: DeepSpeed 0.19.8 keeps the first group in its globals and
    # cannot train in a second one after destroy_process_group.
    shutdown, dist.shutdown = dist.shutdown, lambda: None

    out = Path(argv[0])
    last = "--then-rank1-alone-at-data" in argv
    rest = [a for a in argv[1:] if a != "--then-rank1-alone-at-data"]
    split = rest.index("--")
    cases, overrides = rest[:split], rest[split + 1:]

    def attempt(name: str, spec: str | None, extra: list[str]) -> int:
        os.environ.pop(SIGNAL_AT_ENV, None)
        if spec:
            os.environ[SIGNAL_AT_ENV] = spec
        try:
            cfg = load_config(overrides=[*overrides, *extra, f"train.output_dir={out / name}"])
            run(cfg, prepare(cfg))
        except SystemExit as exc:
            return int(exc.code)
        finally:
            os.environ.pop(SIGNAL_AT_ENV, None)
        return 0

    results = {}
    for case in cases:
        name, _, spec = case.partition("=")
        spec, *extra = spec.split(",")
        spec, resume = spec.removesuffix("@resume"), spec.endswith("@resume")
        results[name] = {"code": attempt(name, None if spec == "-" else spec, extra)}
        if resume:
            results[name]["resumed_code"] = attempt(name, None, extra)
    rank = dist.read_env().rank
    (out / f"rank-{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    if last:
        dist.shutdown = shutdown
        os.environ[SIGNAL_AT_ENV] = "data:1:SIGTERM:1"  # rank 1 exits at once (143); rank 0 waits on it
        cfg = load_config(overrides=[*overrides, f"train.output_dir={out / 'rank1-alone'}"])
        run(cfg, prepare(cfg))
        return
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
    from qlora_dist import dist

    dist.leave(0)  # see compat.exit_without_finalization
