"""The training job: what `qlora-dist train`, a submitit task (launch/submit.py) and the slurm/ scripts run
on every rank. It orchestrates, in the order a failure is cheapest: the config (every problem at once),
then on rank 0 the preflight (every problem that needs no weight), then the trainer, handed what the
preflight resolved. Other ranks wait for rank 0 at the process group's rendezvous (in the trainer's setup),
and the launcher ends them if rank 0 exits with the problems.
"""
from __future__ import annotations

from qlora_dist import dist, preflight
from qlora_dist.config import Config
from qlora_dist.errors import ConfigError
from qlora_dist.run_plan import PreparedRun, parse_run_config
from qlora_dist.train import trainer


def prepare(cfg: Config, problems: list[str] = ()) -> PreparedRun | None:
    """Rank 0: the preflight, raising every problem it finds (the config's own first); what it resolved.
    Other ranks: None (they receive rank 0's) — or the config's problems, which every rank finds alike."""
    world = dist.launcher_env()
    if world.is_main:
        report = preflight.run(cfg, world.world_size, problems)
        report.raise_if_problems()
        return report.prepared
    if problems:
        raise ConfigError(list(problems))
    return None


def train(config_path: str | None, preset: str | None, overrides: list[str]) -> None:
    """`qlora-dist train`."""
    cfg, problems = parse_run_config(config_path, preset, overrides)
    trainer.run(cfg, prepare(cfg, problems))
