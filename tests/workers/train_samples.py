"""Trains the tiny model a few steps on each given dataset, one after another in one process (the
imports and DeepSpeed set-up are paid once), and writes each run's losses to OUT/losses.json.

usage: train_samples.py OUT NAME=DATASET[@FORMAT] ... -- key=value ...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from qlora_dist.compat import quiet_known_warnings, set_library_env


def main(argv: list[str]) -> None:
    set_library_env()
    quiet_known_warnings()
    from qlora_dist.launch import dist
    from qlora_dist.config import load_config
    from qlora_dist.train.trainer import run

    # One process group for all the runs: DeepSpeed 0.19.8 keeps the first group in its globals and
    # cannot train in a second one after destroy_process_group.
    shutdown, dist.shutdown = dist.shutdown, lambda: None

    out, rest = Path(argv[0]), argv[1:]
    split = rest.index("--") if "--" in rest else len(rest)
    samples, overrides = rest[:split], rest[split + 1:]
    losses = {}
    for spec in samples:
        name, _, target = spec.partition("=")
        dataset, _, fmt = target.partition("@")
        run_dir = out / name
        cfg = load_config(overrides=[*overrides, f"data.dataset={dataset}", f"train.output_dir={run_dir}",
                                     *([f"data.format={fmt}"] if fmt else [])])
        run(cfg)
        losses[name] = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                        if '"loss"' in line]
    (out / "losses.json").write_text(json.dumps(losses))
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
