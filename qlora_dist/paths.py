"""The output folder of a run, and every path in it: one object owns the names, so no module spells
a file name of another's.

    OUTPUT/checkpoint-<step>/   complete checkpoints (train/checkpoint.py holds their inside layout)
    OUTPUT/.tmp-checkpoint-<step>/   a save in progress; renamed into place when complete
    OUTPUT/adapter_model/       the final adapter (a copy of the last checkpoint's)
    OUTPUT/completed            written last, when the run finished
    OUTPUT/metrics.jsonl, loss.png   rank 0's records and loss curve
    OUTPUT/data-cache/<fingerprint>/  tokenized data (unless data.cache_dir)
    OUTPUT/submitit/            logs and pickles of `qlora-dist submit` jobs
    OUTPUT/.lock                held by the run writing this folder
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

    def writer_lock(self):
        """The lock rank 0 holds while a run writes this folder: a second run into the same folder stops at
        once instead of overwriting the first one's checkpoints. An OS file lock (filelock), so the kernel
        releases it when the holder dies (SIGKILL, a lost node): a requeued job is never locked out."""
        from filelock import FileLock

        return FileLock(str(self.lock), timeout=0)

    def busy_problem(self) -> str:
        return (f"train.output_dir: {self.root} is being written by another run now (it holds {self.lock}); "
                "wait for it, or use another output folder")

    def held_by_another_run(self) -> bool:
        """Whether another process holds the writer lock now (the preflight asks; nothing is kept)."""
        from filelock import Timeout

        if not self.lock.is_file():
            return False
        try:
            with self.writer_lock():
                return False
        except Timeout:
            return True
