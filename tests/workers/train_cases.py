"""Trains several configurations one after another in one process group (imports and DeepSpeed set-up
are paid once per launch), each into OUT/NAME: the final adapter is in OUT/NAME/adapter as usual.

usage: train_cases.py OUT NAME:key=value,key=value ... -- key=value ...   (the keys after -- apply to all)
"""
from __future__ import annotations

import sys
from pathlib import Path

from qlora_dist.compat import quiet_known_warnings, set_library_env


def main(argv: list[str]) -> None:
    set_library_env()
    quiet_known_warnings()
    from qlora_dist.config import load_config
    from qlora_dist import dist
    from qlora_dist.launch.job import prepare
    from qlora_dist.train.trainer import run

    # One process group for all the runs: DeepSpeed 0.19.8 keeps the first group in its globals and
    # cannot train in a second one after destroy_process_group.
    shutdown, dist.shutdown = dist.shutdown, lambda: None

    out, rest = Path(argv[0]), argv[1:]
    split = rest.index("--") if "--" in rest else len(rest)
    cases, common = rest[:split], rest[split + 1:]
    for case in cases:
        name, _, keys = case.partition(":")
        cfg = load_config(overrides=[*common, *filter(None, keys.split(",")), f"train.output_dir={out / name}"])
        run(cfg, prepare(cfg))
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
    from qlora_dist import dist

    dist.leave(0)  # see compat.exit_without_finalization
