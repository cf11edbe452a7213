"""Training data: examples from the built-in tasks or a dataset, tokenization with label masking,
packing, a per-job cache, and a resumable batch schedule.

The batch schedule is a pure function of (seed, step): the examples of optimizer step s are positions
[s*G, (s+1)*G) of an endless stream of per-epoch orders (G = global batch). A resumed run needs
nothing but the step to continue exactly where it stopped, whatever the world size; each rank takes
its own micro-batches of that global batch, and every example is used once per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora_dist.config import Config
from qlora_dist.data.formats import Example
from qlora_dist.data.prompts import guanaco_turn
from qlora_dist.data.tasks import TaskItem, make_split

IGNORE_INDEX = -100


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
    position_ids: list[int] | None = None  # packed rows only: restart at 0 for each example


def tokenize(example: Example, tokenizer, source_max_len: int, target_max_len: int,
             train_on_source: bool) -> TokenizedExample:
    """As the original QLoRA code: BOS + source and target + EOS tokenized apart, each truncated to its
    own length, source labels masked unless train_on_source."""
    return tokenize_batch([example], tokenizer, source_max_len, target_max_len, train_on_source)[0]


def tokenize_batch(examples: list[Example], tokenizer, source_max_len: int, target_max_len: int,
                   train_on_source: bool) -> list[TokenizedExample]:
    """`tokenize` for many examples in one tokenizer call per side (the fast tokenizer batches in Rust)."""
    if not examples:
        return []
    bos = tokenizer.bos_token or ""
    sources = tokenizer([bos + e.source for e in examples], add_special_tokens=False, truncation=True,
                        max_length=source_max_len)["input_ids"]
    targets = tokenizer([e.target + tokenizer.eos_token for e in examples], add_special_tokens=False,
                        truncation=True, max_length=target_max_len)["input_ids"]
    return [TokenizedExample(s + t, (list(s) if train_on_source else [IGNORE_INDEX] * len(s)) + t)
            for s, t in zip(sources, targets)]


def tokenize_all(examples: list[Example], tokenizer, cfg: Config) -> list[TokenizedExample]:
    d, out = cfg.data, []
    for start in range(0, len(examples), 1024):
        out += tokenize_batch(examples[start:start + 1024], tokenizer, d.source_max_len, d.target_max_len,
                              d.train_on_source)
    return out


def pack(rows: list[TokenizedExample], length: int, seed: int, open_bins: int = 64) -> list[TokenizedExample]:
    """Several examples per row of at most `length` tokens. Examples are taken in a seeded order and
    each goes into the first of the last `open_bins` rows with room for it (first fit over a bounded
    window: near-full rows at linear cost). Position ids restart for every example, which makes
    transformers' attention block-diagonal (its masking utils find packed sequences from the position
    ids when there is no 2D attention mask and no KV cache: training runs with use_cache=False, see
    model.prepare_for_training). Each example's first label is masked: it would otherwise be predicted
    from the previous example's last token, which an unpacked row never does."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    done: list[list[TokenizedExample]] = []
    bins: list[list[TokenizedExample]] = []
    used: list[int] = []
    for i in order:
        r = rows[i]
        n = min(len(r.input_ids), length)
        k = next((k for k, u in enumerate(used) if u + n <= length), None)
        if k is None:
            if len(bins) == open_bins:  # close the fullest row to keep the window bounded
                k = max(range(len(bins)), key=used.__getitem__)
                done.append(bins.pop(k))
                used.pop(k)
            bins.append([])
            used.append(0)
            k = len(bins) - 1
        bins[k].append(r)
        used[k] += n
    return [_concat(b, length) for b in done + bins]


def _concat(members: list[TokenizedExample], length: int) -> TokenizedExample:
    ids, labels, positions = [], [], []
    for r in members:
        ids += r.input_ids[:length]
        labels += [IGNORE_INDEX] + r.labels[1:length]
        positions += list(range(min(len(r.input_ids), length)))
    return TokenizedExample(ids, labels, positions)


def collate(rows: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padding never counts in the loss. Unpacked rows mask padding out
    of attention; packed rows carry position ids instead (the padding is one more short sequence)."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
        positions[i] = torch.tensor((r.position_ids or list(range(n))) + list(range(width - n)))
    if rows[0].position_ids is None:
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def padding_fraction(batches: list[list[TokenizedExample]]) -> float:
    """Share of the positions in these micro-batches that are padding."""
    real = sum(len(r.input_ids) for b in batches for r in b)
    total = sum(len(b) * max(len(r.input_ids) for r in b) for b in batches)
    return 1 - real / total if total else 0.0


class BatchSchedule:
    """Which examples each rank sees at each optimizer step (see the module docstring).

    With `lengths` (data.group_by_length), each epoch's shuffled order is cut into mega-batches of
    MEGA global batches and each mega-batch sorted longest first, so the rows of a micro-batch have
    similar lengths and little padding (the idea of transformers' LengthGroupedSampler); it is still a
    function of (seed, step) alone."""

    MEGA = 16

    def __init__(self, num_examples: int, global_batch: int, micro_batch: int, rank: int, world_size: int,
                 seed: int, lengths: list[int] | None = None):
        if num_examples < global_batch:
            raise ValueError(f"the dataset has {num_examples} examples, fewer than one global batch ({global_batch})")
        self.n, self.global_batch, self.micro = num_examples, global_batch, micro_batch
        self.rank, self.world, self.seed = rank, world_size, seed
        self.accum = global_batch // (micro_batch * world_size)
        self.lengths = lengths
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
            if self.lengths is not None:
                size = self.MEGA * self.global_batch
                order = [i for k in range(0, self.n, size)
                         for i in sorted(order[k:k + size], key=lambda j: -self.lengths[j])]
            self._perms = {epoch: order}  # keep one epoch's order only
        return self._perms[epoch]

    def global_indices(self, step: int) -> list[int]:
        start = step * self.global_batch
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + self.global_batch)]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches of step `step`: micro-batches r*A ... r*A+A-1 of the global batch."""
        idx = self.global_indices(step)
        first = self.rank * self.accum * self.micro
        return [idx[first + k * self.micro: first + (k + 1) * self.micro] for k in range(self.accum)]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n
