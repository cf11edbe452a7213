"""The step guard: what the trainer does about an optimizer step whose numbers went wrong.

- A NaN/inf loss or gradient norm: DeepSpeed skipped the update, as it skips an fp16 overflow (a
  non-finite loss is made such a gradient: model/loss.py; bf16.check_grad_overflow: train/engine.py), so
  weights, optimizer moments and LR schedule stay while the data position and step count move on. The
  guard counts it, records it (`"event": "nonfinite"`), says so, and past train.max_nonfinite_steps stops
  the run with a RunFault naming the step and the last good checkpoint.
- Finite but exploding LoRA weights (optim.lr=1e6 took them to 5e6 while the loss stayed stuck and nothing
  was said, red-team N1): one warning when their norm is WEIGHT_GROWTH times what it was at the start.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from qlora_dist.errors import RunFault
from qlora_dist import dist

WEIGHT_GROWTH = 100.0  # a sane LR moves the LoRA weights' norm a few fold in a whole run


class StepGuard:
    def __init__(self, cfg, log, world_size: int, last_good: Callable[[], Path | None], skipped: int = 0):
        self.cfg, self.log, self.world_size, self.last_good = cfg, log, world_size, last_good
        self.skipped = skipped  # steps of this run (its checkpoints included) skipped for a NaN/inf
        self.start_norm: float | None = None
        self.warned = False

    @staticmethod
    def nonfinite(engine, bad_losses: float) -> bool:
        """Whether this step's update was skipped for a NaN/inf (all ranks agree: bad_losses is summed over
        them, the overflow check is over the reduced gradients). fp16 alone: an overflow with finite losses
        is the dynamic loss scale's own business (DeepSpeed halves it and skips), not counted."""
        return bad_losses > 0 or not (engine.was_step_applied() or engine.fp16_enabled())

    def weight_sq_share(self, engine) -> float:
        """This rank's share of the squared norm of the trainable (LoRA) weights, so that the sum over the
        ranks is the whole: ZeRO-3 holds a partition of each (ds_tensor), other stages all of it on every rank."""
        params = [p for p in engine.module.parameters() if p.requires_grad]
        if not params:
            return 0.0
        partitioned = hasattr(params[0], "ds_tensor")
        parts = [(p.ds_tensor if partitioned else p.detach()).double().pow(2).sum() for p in params]
        return torch.stack(parts).sum().item() / (1 if partitioned else self.world_size)

    def start(self, engine) -> None:
        """The reference norm, before the first step of this process (collective)."""
        self.start_norm = math.sqrt(dist.all_reduce_sum([self.weight_sq_share(engine)])[0])

    def watch(self, step: int, norm: float) -> None:
        """After a finite step: warn once when the LoRA weights' norm has grown WEIGHT_GROWTH-fold."""
        if self.start_norm is None:  # a step outside Trainer.train (tests, benchmarks): the reference
            self.start_norm = norm
        if self.warned or not norm > WEIGHT_GROWTH * max(self.start_norm, 1e-12):
            return
        self.warned = True
        self.log.write({"event": "warning", "step": step, "weight_norm": norm if math.isfinite(norm) else None,
                        "start_weight_norm": self.start_norm})
        self.log.note(f"warning: step {step}: the LoRA weights' norm grew from {self.start_norm:.3g} to {norm:.3g} "
                      f"since the run started (over {WEIGHT_GROWTH:g}x): the updates are exploding; lower "
                      f"optim.lr (now {self.cfg.optim.lr:g}) or set optim.max_grad_norm")

    def skip(self, engine, step: int, bad_losses: int, grad_norm: float | None, zero_stage: int) -> None:
        """After a skipped step: count it, record it, say so; past train.max_nonfinite_steps, stop."""
        if engine.was_step_applied():  # a ZeRO stage without DeepSpeed's overflow check (stage 0)
            raise RunFault(f"step {step}: the loss was NaN/inf on {bad_losses} micro-batch(es) and ZeRO stage "
                           f"{zero_stage} applied the update anyway; stopped before saving it; {self._last_good()}")
        self.skipped += 1
        limit = self.cfg.train.max_nonfinite_steps
        self.log.write({"event": "nonfinite", "step": step, "nonfinite_losses": bad_losses,
                        "grad_norm": grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
                        "skipped": self.skipped, "max_nonfinite_steps": limit})
        what = f"a NaN/inf loss in {bad_losses} micro-batch(es)" if bad_losses else f"gradient norm {grad_norm}"
        self.log.note(f"step {step}: {what}: update skipped ({self.skipped} so far, train.max_nonfinite_steps={limit})")
        if self.skipped > limit:
            raise RunFault(f"step {step}: {self.skipped} steps with a NaN/inf loss or gradient norm, more than "
                           f"train.max_nonfinite_steps={limit}; stopped without saving; {self._last_good()} "
                           "(lower optim.lr or set optim.max_grad_norm)")

    def _last_good(self) -> str:
        found = self.last_good()  # manifest verified, tensors finite
        return f"last good checkpoint: {found}" if found else "no checkpoint saved yet"
