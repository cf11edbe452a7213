"""The output folder of a run, and every path in it: one object owns the names, so no module spells
a file name of another's.

    OUTPUT/checkpoint-<step>/   complete checkpoints (train/checkpoint.py holds their inside layout)
    OUTPUT/.tmp-checkpoint-<step>/   a save in progress; renamed into place when complete
    OUTPUT/adapter_model/       the final adapter (a copy of the last checkpoint's)
    OUTPUT/model/               train.method=full: the trained model, sharded safetensors (train/model_export.py)
    OUTPUT/completed            written last, when the run finished
    OUTPUT/metrics.jsonl, loss.png   rank 0's records and loss curve
    OUTPUT/tensorboard/, wandb/, mlruns/, trackers.json   train.report_to's trackers (train/trackers.py)
    OUTPUT/data-cache/<fingerprint>/  tokenized data (unless data.cache_dir)
    OUTPUT/submitit/            logs and pickles of `qlora-dist submit` jobs
    OUTPUT/.lock, .lock.json    held by the run writing this folder, and who that is
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"


@dataclass(frozen=True)
class RunPaths:
    root: Path
    cache_dir: Path | None = None  # data.cache_dir, when set

    @classmethod
    def of(cls, cfg) -> "RunPaths":
        return cls(Path(cfg.train.output_dir), Path(cfg.data.cache_dir) if cfg.data.cache_dir else None)

    def checkpoint(self, step: int) -> Path:
        return self.root / f"checkpoint-{step}"

    def partial_checkpoint(self, step: int) -> Path:
        return self.root / f"{TMP_PREFIX}{step}"

    def partial_checkpoints(self) -> list[Path]:
        return sorted(self.root.glob(TMP_PREFIX + "*")) if self.root.is_dir() else []

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (their progress record written), oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := CHECKPOINT_RE.match(p.name)) and (p / "progress.json").is_file()]
        return [p for _, p in sorted(found)]

    @property
    def adapter(self) -> Path:
        return self.root / "adapter_model"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def completed(self) -> Path:
        return self.root / "completed"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def loss_png(self) -> Path:
        return self.root / "loss.png"

    @property
    def data_cache(self) -> Path:
        return self.cache_dir or self.root / "data-cache"

    @property
    def submitit(self) -> Path:
        return self.root / "submitit"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def lock_record(self) -> Path:
        return self.root / ".lock.json"

    def writer_lock(self):
        """The OS file lock under the run's writer lock (qlora_dist/writer_lock.py holds the policy)."""
        from filelock import FileLock

        return FileLock(str(self.lock), timeout=0)
