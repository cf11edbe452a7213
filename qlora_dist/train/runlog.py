"""What a run shows and leaves behind, on rank 0 only: a tqdm bar (loss, LR, tokens/s, memory),
OUTPUT/metrics.jsonl (one record per logged step and per evaluation), the same records in the trackers of
train.report_to (train/trackers.py: `write` is the one place that fans out), and OUTPUT/loss.png at the end
(training loss, and the validation loss when there is one)."""
from __future__ import annotations

import json
import resource
import sys
import time

import torch

from qlora_dist import atomic
from qlora_dist import dist
from qlora_dist.paths import RunPaths
from qlora_dist.train.engine import paged_optimizer_gb
from qlora_dist.train.paged_masters import paged_masters_gb
from qlora_dist.train import trackers


def memory_gb() -> tuple[str, float]:
    """('gpu', peak allocated GB) on CUDA, else ('rss', this process's peak resident GB)."""
    if torch.cuda.is_available():
        return "gpu", torch.cuda.max_memory_allocated() / 1e9
    return "rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


class RunLog:
    def __init__(self, paths: RunPaths, start_step: int, max_steps: int, report_to: list[str] = (),
                 config: dict | None = None):
        """`report_to`: tracker names; `config`: the resolved config, logged to them as hyperparameters."""
        self.path, self.png = paths.metrics, paths.loss_png
        self.main = dist.is_main()
        self.start_step, self.max_steps = start_step, max_steps
        self.bar = None  # made at the first step: a bar standing at 0/N through minutes of setup says nothing
        self.throughput = None  # a train.throughput.Throughput, set once the model's size is known
        self.sinks: list[trackers.Sink] = []
        self.eval_loss = None
        if self.main:
            paths.root.mkdir(parents=True, exist_ok=True)
            self._drop_records_after(start_step)
            if report_to:
                self.sinks = trackers.open_sinks(list(report_to), paths.root, config or {}, start_step, self._read())

    def _bar(self):
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.max_steps, initial=self.start_step, desc="train", unit="step",
                            dynamic_ncols=True)
        return self.bar

    def _drop_records_after(self, step: int) -> None:
        """On resume, steps after the checkpoint were lost with the process and will be redone."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))  # a signal here must not truncate it

    def note(self, message: str) -> None:
        """A message that does not tear the progress bar."""
        if self.main and self.bar is not None:
            self.bar.write(f"[qlora-dist] {message}", file=sys.stderr)
        else:
            dist.log(message)

    def write(self, record: dict) -> None:
        if not self.main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        if record.get("event") == "validation":
            self.eval_loss = record["eval_loss"]  # shown on the bar from here on
        if self.sinks and (found := trackers.metrics_of(record)):
            self._to_sinks("log", *found)

    def _to_sinks(self, call: str, *args) -> None:
        """A tracker that fails (its server gone, wandb-core ended by the job's SIGTERM) records nothing more,
        with one line saying so; the run and metrics.jsonl go on."""
        for sink in list(self.sinks):
            try:
                getattr(sink, call)(*args)
            except Exception as exc:
                self.sinks.remove(sink)
                self.note(f"train.report_to: {sink.name} failed ({type(exc).__name__}: {exc}); "
                          "it records nothing more in this run (metrics.jsonl does)")

    def step(self, step: int, loss: float, lr: float, tokens: float, seconds: float, grad_norm: float | None,
             log_this_step: bool) -> None:
        if not self.main:
            return
        kind, mem = memory_gb()
        tps = tokens / max(seconds, 1e-9)
        self._bar().update(1)
        speed = self.throughput.of(tokens, seconds) if self.throughput else {}
        per_gpu = {**({"tok_s_group": f"{speed['tokens_per_s_per_group']:.0f}"} if "tokens_per_s_per_group" in speed else {}),
                   "tok_s_gpu": f"{speed['tokens_per_s_per_gpu']:.0f}",
                   "mfu": "n/a" if speed["mfu"] is None else f"{100 * speed['mfu']:.1f}%"} if speed else {}
        shown = {} if self.eval_loss is None else {"val_loss": f"{self.eval_loss:.4f}"}
        self.bar.set_postfix(loss=f"{loss:.4f}", **shown, lr=f"{lr:.2e}", tok_s=f"{tps:.0f}", **per_gpu,
                             **{f"{kind}_gb": f"{mem:.2f}"})
        if log_this_step:
            self.write({"step": step, "loss": loss, "lr": lr, "tokens": tokens, "tokens_per_s": tps, **speed,
                        "grad_norm": grad_norm, f"{kind}_peak_gb": mem, "paged_optimizer_gb": paged_optimizer_gb(),
                        "paged_masters_gb": paged_masters_gb(),
                        "step_s": seconds})

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def records(self, event: str | None = None) -> list[dict]:
        rows = self._read()
        return [r for r in rows if r.get("event") == event] if event else [r for r in rows if "loss" in r]

    def plot(self) -> None:
        if not self.main:
            return
        rows = self.records()
        if not rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="training loss")
        if validation := self.records("validation"):
            ax.plot([r["step"] for r in validation], [r["eval_loss"] for r in validation], "o-", lw=1.5,
                    label="validation loss")
            ax.legend()
        ax.set(xlabel="optimizer step", ylabel="loss", title="qlora-dist loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.png, dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._to_sinks("close")
        self.sinks = []  # closed once (a stop closes them before cleanup does)
