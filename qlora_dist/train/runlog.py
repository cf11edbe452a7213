"""What a run shows and leaves behind, on rank 0 only: a tqdm bar (loss, LR, tokens/s, memory),
OUTPUT/metrics.jsonl (one record per logged step and per evaluation) and OUTPUT/loss.png at the end."""
from __future__ import annotations

import json
import resource
import sys
import time

import torch

from qlora_dist import atomic
from qlora_dist.launch import dist
from qlora_dist.paths import RunPaths


def memory_gb() -> tuple[str, float]:
    """('gpu', peak allocated GB) on CUDA, else ('rss', this process's peak resident GB)."""
    if torch.cuda.is_available():
        return "gpu", torch.cuda.max_memory_allocated() / 1e9
    return "rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


class RunLog:
    def __init__(self, paths: RunPaths, start_step: int, max_steps: int):
        self.path, self.png = paths.metrics, paths.loss_png
        self.main = dist.is_main()
        self.start_step, self.max_steps = start_step, max_steps
        self.bar = None  # made at the first step: a bar standing at 0/N through minutes of setup says nothing
        if self.main:
            paths.root.mkdir(parents=True, exist_ok=True)
            self._drop_records_after(start_step)

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
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def step(self, step: int, loss: float, lr: float, tokens: float, seconds: float, grad_norm: float | None,
             log_this_step: bool) -> None:
        if not self.main:
            return
        kind, mem = memory_gb()
        tps = tokens / max(seconds, 1e-9)
        self._bar().update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}", **{f"{kind}_gb": f"{mem:.2f}"})
        if log_this_step:
            self.write({"step": step, "loss": loss, "lr": lr, "tokens": tokens, "tokens_per_s": tps,
                        "grad_norm": grad_norm, f"{kind}_peak_gb": mem, "step_s": seconds})

    def records(self, event: str | None = None) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
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
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
        ax.set(xlabel="optimizer step", ylabel="training loss", title="qlora-dist training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.png, dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
