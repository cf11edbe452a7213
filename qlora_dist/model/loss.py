"""The training objective of one optimizer step, the same whatever the split of its global batch.

DeepSpeed's loop makes each micro-batch's loss a mean over that micro-batch, divides it by the
accumulation steps and averages gradients over the ranks: a mean of means, so the update depends on how
the global batch is cut (with rows of different lengths, micro 1 x accumulation 8 and micro 8 x 1 gave
adapters 2.9% apart after 3 steps; the fault transformers fixed in 2024, #34191). Here every labelled
position gets a weight fixed by the *global* batch, so that the sum over all micro-batches of all ranks
of weight x cross-entropy is the step's objective:

- `sequence`: the mean over the global batch's examples of each example's mean loss over its target
  tokens (what qlora.py computed with one example per micro-batch and 16 accumulation steps). A packed
  row holds several examples; they are told apart by their position ids, which restart at 0.
- `token`: the sum over all target tokens of the global batch over their count.

The global counts are computed on every rank from the global batch itself (a pure function of the step,
and every rank holds all rows), so they need no collective. A loss term is a label that an earlier
position of its row predicts (labels shift by one), as in transformers' ForCausalLMLoss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qlora_dist.data.batches import IGNORE_INDEX
from qlora_dist.model.fastpath import weighted_cross_entropy


def loss_terms(labels: torch.Tensor, position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(terms, sizes), both shaped like labels: whether a position's label is a loss term, and the number
    of loss terms of the example the position belongs to (an unpacked row is one example)."""
    terms = labels != IGNORE_INDEX
    terms[:, 0] = False  # nothing predicts a row's first token
    if position_ids is None:
        example = torch.zeros_like(labels)
    else:
        example = (position_ids == 0).cumsum(1)  # 1, 2, ... within each row
    rows, width = labels.shape
    key = example + torch.arange(rows, device=labels.device)[:, None] * (width + 1)  # unique per (row, example)
    counts = torch.zeros(rows * (width + 1), dtype=torch.long, device=labels.device)
    counts.scatter_add_(0, key.reshape(-1), terms.reshape(-1).long())
    return terms, counts[key]


@dataclass(frozen=True)
class StepObjective:
    """Per-position weights of one optimizer step: `divisor` is the global batch's count of examples
    with a target (sequence) or of target tokens (token)."""

    normalization: str
    divisor: int

    @classmethod
    def of(cls, normalization: str, global_batch: dict[str, torch.Tensor]) -> StepObjective:
        terms, sizes = loss_terms(global_batch["labels"], global_batch.get("position_ids"))
        if normalization == "token":
            return cls(normalization, int(terms.sum()))
        return cls(normalization, int((terms.float() / sizes.clamp(min=1)).sum().round()))  # 1 per example

    def weights(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """fp32 weight of each label position of this micro-batch (0 where the label is no loss term)."""
        terms, sizes = loss_terms(batch["labels"], batch.get("position_ids"))
        per_term = 1.0 / max(self.divisor, 1)
        if self.normalization == "token":
            return terms.float() * per_term
        return terms.float() * per_term / sizes.clamp(min=1).float()


def shard_for_group(batch: dict[str, torch.Tensor], weights: torch.Tensor, size: int,
                    sequence_rank: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """This rank's 1/`size` slice of every row (dist.sequence_parallel), and its weights. The labels and
    weights are shifted on the whole row first (`shift_labels`, transformers' name, tells the loss so):
    on a slice, the label a slice's last position predicts is the next slice's first, which `_shift`
    within the slice would lose, and `loss_terms` would drop each slice's first label as a row's. The
    weights come from the whole rows (`StepObjective.weights`), so the step's objective is the same
    whatever dist.sequence_parallel is. No attention mask: Ulysses drops it (DeepSpeed 0.19.8
    uattn_wrapper) and attends causally over the gathered row, whose padding lies after its tokens."""
    width = batch["input_ids"].shape[1] // size
    cut = slice(sequence_rank * width, (sequence_rank + 1) * width)
    shift_labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    shift_weights = torch.nn.functional.pad(weights, (0, 1))[:, 1:]
    part = {"input_ids": batch["input_ids"][:, cut], "position_ids": batch["position_ids"][:, cut],
            "shift_labels": shift_labels[:, cut]}
    return {k: v.contiguous() for k, v in part.items()}, shift_weights[:, cut].contiguous()


def micro_loss(engine, batch: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """This micro-batch's share of the step's objective: the sum of weight x cross-entropy."""
    return weighted_loss(engine, engine.module, batch, weights)


def weighted_loss(forward, model, batch: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum of weight x cross-entropy of `batch`, run through `forward` (the engine in training, the module
    itself in validation). The fused loss (model.fused_loss, fastpath.py) takes the weights in its forward;
    transformers' forward knows no such key, so without the fused loss the logits come back and the loss
    is computed here."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(causal_lm, "_qlora_fused_loss", False):
        return forward(**batch, loss_weights=weights).loss
    logits = forward(**{k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}).logits
    if "shift_labels" in batch:  # a sequence-parallel slice (shard_for_group)
        return weighted_cross_entropy(logits, batch["shift_labels"], weights, shifted=True)
    return weighted_cross_entropy(logits, batch["labels"], weights)


def backward(engine, loss: torch.Tensor, divisor: int) -> float:
    """Backward of a micro-batch's share; returns its value. The share is already normalised by the
    global batch, so DeepSpeed 0.19.8's own scaling is undone: engine.backward divides by the
    accumulation steps unless scale_wrt_gas=False, and ZeRO stages 1-3 divide the reduced gradients by the
    data-parallel world size (stage_1_and_2.average_tensor, stage3.__avg_scatter_contiguous_grads), which
    we multiply back. The sum over ranks and micro-batches is then the gradient of the objective.
    `divisor` is what DeepSpeed divides by (compat.gradient_divisor): the world size, or under
    dist.sequence_parallel mostly world / sequence_parallel_size (each rank of a group backs the loss of
    its own slice; the all-to-all's backward carries the rest, so the group's gradients sum to the rows').

    A non-finite loss is multiplied by NaN, which makes every gradient of this rank NaN (0 x NaN is NaN):
    DeepSpeed's overflow check, over the reduced gradients of all ranks, then skips the step on every rank
    even where a loss of inf came with finite gradients."""
    value = loss.item()
    if not math.isfinite(value):
        loss = loss * math.nan
    engine.backward(loss * divisor, scale_wrt_gas=False)
    return value
