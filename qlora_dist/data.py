"""Training data: source/target pairs, tokenization with label masking, and a resumable batch schedule.

The batch schedule is a pure function of (seed, step): the examples of optimizer step s are positions
[s*G, (s+1)*G) of an endless stream of per-epoch permutations (G = global batch). A resumed run needs
nothing but the step to continue exactly where it stopped, whatever the world size; each rank takes
its own micro-batches of that global batch, and every example is used once per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Config
from .prompts import guanaco_turn
from .tasks import TaskItem, make_split

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    source: str  # the prompt; its labels are masked unless train_on_source
    target: str  # what the model learns to produce


def from_task(item: TaskItem) -> Example:
    return Example(source=guanaco_turn(item.prompt), target=" " + item.answer)


def builtin_examples(cfg: Config) -> tuple[list[Example], list[TaskItem]]:
    """Training examples and held-out items of the built-in tasks."""
    train, held_out = make_split(cfg.data.tasks, cfg.data.num_train, cfg.data.num_eval, seed=cfg.train.seed)
    return [from_task(i) for i in train], held_out


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


def tokenize(example: Example, tokenizer, source_max_len: int, target_max_len: int,
             train_on_source: bool) -> TokenizedExample:
    """As the original QLoRA code: BOS + source and target + EOS tokenized apart, each truncated to its
    own length, source labels masked unless train_on_source."""
    bos = tokenizer.bos_token or ""
    source = tokenizer(bos + example.source, add_special_tokens=False, truncation=True,
                       max_length=source_max_len)["input_ids"]
    target = tokenizer(example.target + tokenizer.eos_token, add_special_tokens=False, truncation=True,
                       max_length=target_max_len)["input_ids"]
    labels = (source if train_on_source else [IGNORE_INDEX] * len(source)) + target
    return TokenizedExample(source + target, labels)


def tokenize_all(examples: list[Example], tokenizer, cfg: Config) -> list[TokenizedExample]:
    d = cfg.data
    return [tokenize(e, tokenizer, d.source_max_len, d.target_max_len, d.train_on_source) for e in examples]


def collate(rows: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padding is masked out of attention and loss."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class BatchSchedule:
    """Which examples each rank sees at each optimizer step (see the module docstring)."""

    def __init__(self, num_examples: int, global_batch: int, micro_batch: int, rank: int, world_size: int,
                 seed: int):
        if num_examples < global_batch:
            raise ValueError(f"the dataset has {num_examples} examples, fewer than one global batch ({global_batch})")
        self.n, self.global_batch, self.micro = num_examples, global_batch, micro_batch
        self.rank, self.world, self.seed = rank, world_size, seed
        self.accum = global_batch // (micro_batch * world_size)
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}  # keep one epoch's order only
        return self._perms[epoch]

    def global_indices(self, step: int) -> list[int]:
        start = step * self.global_batch
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + self.global_batch)]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches of step `step`: micro-batches r*A ... r*A+A-1 of the global batch."""
        idx = self.global_indices(step)
        first = self.rank * self.accum * self.micro
        return [idx[first + k * self.micro: first + (k + 1) * self.micro] for k in range(self.accum)]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n
