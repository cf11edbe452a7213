"""Submitting a run through submitit (`qlora-dist submit`): to Slurm, or to this machine (`--cluster local`).

The submitted object is a checkpointable `TrainJob`. Each task submitit starts (one per GPU) turns
submitit's job environment into the launcher variables our ranks read, then runs the ordinary trainer.
On a time-limit or preemption signal the trainer saves a checkpoint at a step boundary agreed by all
ranks and hands over to submitit's handler, which pickles the job and requeues it; the requeued job runs
the same config and continues from the newest checkpoint in train.output_dir.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from qlora_dist.errors import ConfigError


@dataclass
class TrainJob(submitit.helpers.Checkpointable):
    config_path: str | None = None
    preset: str | None = None
    overrides: list[str] = field(default_factory=list)

    def __call__(self) -> str:
        from qlora_dist.launch.job import train

        # submitit's own helper turns its job environment into the launcher variables our ranks read
        # (rendezvous at the job's first host, a port drawn from the job id). CUDA_VISIBLE_DEVICES is left
        # alone: dist.device_for picks the GPU by LOCAL_RANK. overwrite: a requeued or nested job may
        # inherit the variables of the process that submitted it.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        train(self.config_path, self.preset, self.overrides)  # a ConfigError fails the job with its problems
        return "done"


def executor_for(cluster: str, folder: Path, nodes: int, tasks_per_node: int, gpus_per_node: int,
                 cpus_per_task: int, timeout_min: int, partition: str | None, signal_delay_s: int):
    executor = submitit.AutoExecutor(folder=str(folder), cluster=None if cluster == "auto" else cluster)
    params = dict(nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=cpus_per_task, timeout_min=timeout_min,
                  name="qlora-dist")
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if executor.cluster == "slurm":
        params.update(slurm_signal_delay_s=signal_delay_s, **({"slurm_partition": partition} if partition else {}))
    executor.update_parameters(**params)
    return executor


def submit(ns, overrides: list[str], config_path: str | None):
    from qlora_dist import atomic, preflight
    from qlora_dist.config import COUNT, POSITIVE, range_problems
    from qlora_dist.paths import RunPaths
    from qlora_dist.run_plan import parse_run_config

    cfg, problems = parse_run_config(config_path, ns.preset, overrides)
    options = range_problems([("--nodes", ns.nodes, POSITIVE), ("--gpus-per-node", ns.gpus_per_node, COUNT),
                              ("--cpus-per-task", ns.cpus_per_task, POSITIVE), ("--timeout-min", ns.timeout_min, POSITIVE),
                              ("--signal-delay-s", ns.signal_delay_s, COUNT)]
                             + ([("--tasks-per-node", ns.tasks_per_node, POSITIVE)] if ns.tasks_per_node is not None else []))
    if options:  # the world size is not known: the preflight would add a line about it
        raise ConfigError(problems + options)
    tasks = ns.tasks_per_node or max(ns.gpus_per_node, 1)
    # The whole preflight here, before anything is queued: a bad path costs seconds, not a queue wait.
    report = preflight.run(cfg, ns.nodes * tasks, problems, cuda=True if ns.gpus_per_node else None, for_train=False)
    if not report.problems:  # submitit writes its logs and pickles there
        report.problems += atomic.output_problems(RunPaths.of(cfg).submitit, "train.output_dir", folder=True)
    report.raise_if_problems()
    for warning in report.warnings:
        print(f"qlora-dist: warning: {warning}", file=sys.stderr)
    folder = RunPaths.of(cfg).submitit
    executor = executor_for(ns.cluster, folder, ns.nodes, tasks, ns.gpus_per_node, ns.cpus_per_task,
                            ns.timeout_min, ns.partition, ns.signal_delay_s)
    return executor.submit(TrainJob(config_path, ns.preset, list(overrides)))
