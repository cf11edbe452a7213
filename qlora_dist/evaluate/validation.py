"""Validation loss on held-out rows of the user's own data (qlora.py's eval_dataset_size / do_eval).

The rows: `data.eval_size` tokenized training rows drawn by train.seed (`split`: taken out by index, so
they never enter the BatchSchedule, however the cache was built; with packing a row is a packed row), or
`data.eval_dataset`, another file prepared exactly as data.dataset is (format, lengths, packing, cache).

The value is normalised like the training loss (model/loss.py, train.loss_normalization): `sequence`, the
mean over the held-out examples of each one's mean loss over its target tokens; `token`, the mean over all
their target tokens. It is the same on any world size: the batches are cut before they are dealt to the
ranks (mmlu.deal_batches: each row scored once, in the same batch, ranks short of batches rerun one for
ZeRO-3 and drop it), and the ranks' sums of weight x cross-entropy and of weights are added in fp64.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from qlora_dist.data.batches import collate
from qlora_dist.errors import ConfigError
from qlora_dist.evaluate.mmlu import deal_batches
from qlora_dist import dist
from qlora_dist.model.loss import StepObjective, weighted_loss


def split(n: int, eval_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of `n` rows, both ascending: `eval_size` rows drawn by `seed`."""
    g = torch.Generator().manual_seed(seed * 7919 + 104_729)  # a stream of its own, not the batch order's
    held = sorted(torch.randperm(n, generator=g)[:eval_size].tolist())
    chosen = set(held)
    return [i for i in range(n) if i not in chosen], held


class RowSubset:
    """Some of the tokenized rows, by index, indexable as the rows themselves are (len, [i], lengths())."""

    def __init__(self, rows, indices: list[int]):
        self.rows, self.indices = rows, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int | slice):
        if isinstance(i, slice):  # a list of rows, as a slice of the rows themselves gives
            return [self.rows[j] for j in self.indices[i]]
        return self.rows[self.indices[i]]

    def lengths(self) -> list[int]:
        every = self.rows.lengths()
        return [every[i] for i in self.indices]


def held_out(cfg, rows, prepare: Callable) -> tuple[object, object | None]:
    """(training rows, validation rows or None). `prepare(cfg)` returns the tokenized rows of cfg's
    data.dataset (data.corpus.prepare's), used for data.eval_dataset."""
    d = cfg.data
    if d.eval_dataset:
        other = dataclasses.replace(cfg, data=dataclasses.replace(d, dataset=d.eval_dataset, eval_dataset=None))
        held = prepare(other)
        dist.log(f"validation loss on {len(held):,} rows of data.eval_dataset {d.eval_dataset}")
        return rows, held
    if not d.eval_size:
        return rows, None
    if d.eval_size >= len(rows):
        raise ConfigError([f"data.eval_size: {d.eval_size} held-out rows of {len(rows)} leave none to train on"])
    train, held = split(len(rows), d.eval_size, cfg.train.seed)
    dist.log(f"validation loss on {d.eval_size:,} of the {len(rows):,} training rows, held out (data.eval_size)")
    return RowSubset(rows, train), RowSubset(rows, held)


def loss_sums(model, rows, batch_size: int, pad_id: int, normalization: str, rank: int, world_size: int,
              device, check_stop: Callable | None = None) -> tuple[float, float]:
    """This rank's (sum of weight x cross-entropy, sum of weights) over its batches of `rows`. Weights
    with divisor 1: each example's tokens weigh 1/its target count (sequence), or 1 each (token)."""
    per_example = StepObjective(normalization, 1)
    loss_sum = weight_sum = 0.0
    for indices, keep in deal_batches(rows.lengths(), batch_size, rank, world_size):
        if check_stop:
            check_stop()
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in indices], pad_id).items()}
        weights = per_example.weights(batch)
        with torch.no_grad():
            value = weighted_loss(model, model, batch, weights)
        if keep:
            loss_sum += float(value)
            weight_sum += float(weights.double().sum())
    return loss_sum, weight_sum


def validation_loss(model, rows, batch_size: int, pad_id: int, normalization: str, rank: int, world_size: int,
                    device, check_stop: Callable | None = None) -> float:
    """The validation loss of `model` (in eval mode) on `rows`, the same on every rank (collective)."""
    local = loss_sums(model, rows, batch_size, pad_id, normalization, rank, world_size, device, check_stop)
    total, weight = dist.all_reduce_sum(list(local))
    return total / weight if weight else math.nan


def problems(cfg) -> list[str]:
    """The preflight's: data.eval_dataset must name data that exists (its rows are read at setup)."""
    from qlora_dist.data import records

    if not cfg.data.eval_dataset:
        return []
    try:
        records.resolve(cfg.data.eval_dataset, cfg.data.format, key="data.eval_dataset")
    except ConfigError as exc:
        return exc.problems
    return []
