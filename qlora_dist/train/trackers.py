"""Experiment trackers (train.report_to): TensorBoard, Weights & Biases, MLflow, fed by RunLog.write from the
very records that go into metrics.jsonl, on rank 0 only, each through the library's own API.

What each receives: the resolved config as hyperparameters once per start, then per record (`metrics_of`)
train/* (loss, lr, grad_norm, tokens_per_s, memory, ... of every logged step), eval/loss (validation loss),
heldout/<task>/* (built-in exact match) and mmlu/accuracy, mmlu/subjects/<subject>/accuracy, ... (MMLU),
all on the optimizer-step axis.
Run name: the output folder's name. Default homes, inside the output folder: tensorboard/, wandb/ (offline),
mlruns/ (MLflow file store); WANDB_MODE / WANDB_DIR / WANDB_PROJECT and MLFLOW_TRACKING_URI /
MLFLOW_EXPERIMENT_NAME, when set, take over. The wandb and MLflow run ids live in OUTPUT/trackers.json.

Resume from checkpoint-k after a crash at step c > k (steps k+1..c are trained again):
- TensorBoard: the writer opens with purge_step=k+1, so readers drop the events k+1..c of the earlier files.
- wandb offline cannot resume a run: each start writes a new offline-run-*-<id> folder of the same run id,
  and first replays into it the records up to step k from metrics.jsonl (what survived the crash), then
  logs steps > k as they come. So every folder holds each step at most once, and the union of the folders,
  read newest folder first (per step, the newest folder that holds it), holds each step once: the newest
  folder alone is the whole history. A replay is needed because wandb-core writes its .wandb file only every
  x_transaction_log_flush_interval (15 s in wandb 0.31, no flush call): a kill loses that file's last
  seconds, steps before the checkpoint included. `wandb sync` the newest folder (a server given the folders
  in order drops steps below the run's current one; resume is exact, so those values are equal anyway).
- MLflow: the same run is reopened; a (metric, step) already in its history is not logged again, so no step
  appears twice in a metric's history (the earlier process's values stay; resume is exact).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time
import uuid
from pathlib import Path

from qlora_dist import atomic
from qlora_dist.config import TRACKERS, flat
from qlora_dist.errors import RunFault

PROJECT = "qlora-dist"  # wandb project and MLflow experiment unless the environment names one
# metrics.jsonl record kind (its "event"; None: a training step) -> tracker name prefix
PREFIXES = {None: "train", "validation": "eval", "eval": "heldout", "mmlu": "mmlu"}
NOT_METRICS = ("event", "step", "time", "when")
# where a record nests its report under one key, the key adds nothing to the name: heldout/add/accuracy
REPORT_KEYS = ("builtin", "mmlu")


def problems(names: list[str]) -> list[str]:
    """The preflight's: every tracker asked for must be installed (a missing one names its extra)."""
    return [f"train.report_to: {name} is not installed; pip install 'qlora-dist[{TRACKERS[name][1]}]'"
            for name in names if name in TRACKERS and importlib.util.find_spec(TRACKERS[name][0]) is None]


def metrics_of(record: dict) -> tuple[int, dict[str, float]] | None:
    """(step, {name: number}) of a metrics.jsonl record, or None for records that are no metrics (plan,
    data, stop, ...). Nested reports are flattened with '/'; lists and non-numbers are left out."""
    prefix = PREFIXES.get(record.get("event"), None)
    if prefix is None or "step" not in record or (record.get("event") is None and "loss" not in record):
        return None
    out: dict[str, float] = {}
    _flatten(prefix, {k: v for k, v in record.items() if k not in NOT_METRICS}, out)
    return int(record["step"]), out


def _flatten(prefix: str, value, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(prefix if k in REPORT_KEYS else f"{prefix}/{k}", v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix.replace("/eval_", "/")] = float(value)  # validation's eval_loss -> eval/loss


def hyperparameters(config: dict) -> dict[str, str | float | int | bool]:
    """The resolved config as flat `group.key` scalars (lists and None as text): what every tracker takes."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flat(config).items()}


class Sink:
    """One tracker: opened once per start of a run, then `log` per record, `close` at the end."""

    name = ""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardSink(Sink):
    name = "tensorboard"

    def __init__(self, root: Path, name: str, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step: readers drop the events of earlier files from this step on (the steps redone after
        # the checkpoint). 0 on a fresh start: leftovers of a run that died before its first checkpoint.
        self.writer = SummaryWriter(str(root / "tensorboard"), purge_step=start_step + 1 if start_step else 0)
        for summary in hparams(hyperparameters(config), {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", f"run {name}\n\n" + "\n".join(
            f"    {k}: {v}" for k, v in hyperparameters(config).items()), start_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a step takes seconds: on disk before a kill, rather than every 120 s

    def close(self) -> None:
        self.writer.close()


class WandbSink(Sink):
    name = "wandb"

    def __init__(self, root: Path, name: str, config: dict, ids: dict, history: list[dict]):
        import wandb

        env = os.environ
        ids.setdefault("wandb", uuid.uuid4().hex[:8])
        self.run = wandb.init(
            id=ids["wandb"], resume="allow", config=config, name=None if "WANDB_NAME" in env else name,
            project=None if "WANDB_PROJECT" in env else PROJECT, dir=None if "WANDB_DIR" in env else str(root),
            mode=None if "WANDB_MODE" in env else "offline",
            settings=wandb.Settings(console="off", silent=True))  # the bar and our log lines stay ours
        if os.environ.get("WANDB_MODE", "offline") in ("offline", "dryrun"):  # a server keeps its own history
            for step, metrics in filter(None, map(metrics_of, history)):
                self.log(step, metrics)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink(Sink):
    name = "mlflow"

    def __init__(self, root: Path, name: str, config: dict, ids: dict):
        if "MLFLOW_TRACKING_URI" not in os.environ:
            # mlflow 3.x refuses its file store unless this is set; the file store is what works offline
            # with mlflow-skinny (no database libraries)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or (root / "mlruns").resolve().as_uri())
        self.resumed = "mlflow" in ids  # a run reopened: its history may hold steps this start logs again
        self.run_id, self.seen = self._open(ids, name), {}
        params = hyperparameters(config)
        known = self.client.get_run(self.run_id).data.params
        self._batch(params=[(k, str(v)[:6000]) for k, v in params.items() if k not in known])  # params are immutable

    def _open(self, ids: dict, name: str) -> str:
        run_id = ids.get("mlflow")
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
        ids["mlflow"] = self.client.create_run(exp_id, run_name=name).info.run_id
        return ids["mlflow"]

    def _batch(self, metrics=(), params=()) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        metrics, params = [Metric(k, v, now, s) for k, v, s in metrics], [Param(k, v) for k, v in params]
        for i in range(0, max(len(metrics), len(params)), 100):  # log_batch takes up to 100 params at once
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 100], params=params[i:i + 100])

    def _logged_steps(self, key: str) -> set[int]:
        """Steps of `key` already in the run (only a resumed run has any): never logged twice."""
        if key not in self.seen:
            self.seen[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)} if self.resumed else set()
        return self.seen[key]

    def log(self, step: int, metrics: dict[str, float]) -> None:
        fresh = [(k, v, step) for k, v in metrics.items() if step not in self._logged_steps(k) and math.isfinite(v)]
        for k, _, _ in fresh:
            self.seen[k].add(step)
        self._batch(metrics=fresh)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_sinks(names: list[str], root: Path, config: dict, start_step: int, history: list[dict]) -> list[Sink]:
    """Rank 0's trackers for a run starting (or resuming) at `start_step` in output folder `root`;
    `history`: the metrics.jsonl records kept from before (steps up to start_step)."""
    ids_file = root / "trackers.json"
    ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
    sinks = []
    for name in dict.fromkeys(names):
        try:
            sinks.append(TensorBoardSink(root, root.name, config, start_step) if name == "tensorboard" else
                         WandbSink(root, root.name, config, ids, history) if name == "wandb" else
                         MlflowSink(root, root.name, config, ids))
        except ImportError as exc:
            raise RunFault(f"train.report_to: {name} cannot be imported ({exc}); "
                           f"pip install 'qlora-dist[{TRACKERS[name][1]}]'") from None
        except Exception as exc:  # a tracker's own failure (e.g. a server named by the environment)
            raise RunFault(f"train.report_to: {name} failed to start: {type(exc).__name__}: {exc}") from None
    atomic.write_text(ids_file, json.dumps(ids, indent=1))
    return sinks
