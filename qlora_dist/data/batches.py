"""Training data: examples from the built-in tasks or a dataset, tokenization with label masking,
packing, a per-job cache, and a resumable batch schedule.

The batch schedule is a pure function of (seed, step): the examples of optimizer step s are positions
[s*G, (s+1)*G) of an endless stream of per-epoch orders (G = global batch). A resumed run needs
nothing but the step to continue exactly where it stopped, whatever the world size; each rank takes
its own micro-batches of that global batch, and every example is used once per epoch.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch

from qlora_dist.config import Config
from qlora_dist.data.formats import Example
from qlora_dist.data.prompts import Message, guanaco_segments, guanaco_turn, template_text
from qlora_dist.data.tasks import TaskItem, make_split
from qlora_dist.errors import ConfigError

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
    skip: str | None = None  # a formats.SKIP_REASONS reason: no row (drop it and count it; see drop_skipped)


def tokenize(example: Example, tokenizer, source_max_len: int, target_max_len: int,
             train_on_source: bool) -> TokenizedExample:
    """As the original QLoRA code: BOS + source and target + EOS tokenized apart, each truncated to its
    own length, source labels masked unless train_on_source."""
    return tokenize_batch([example], tokenizer, source_max_len, target_max_len, train_on_source)[0]


def tokenize_batch(examples: list[Example], tokenizer, source_max_len: int, target_max_len: int,
                   train_on_source: bool, chat_template: str = "guanaco") -> list[TokenizedExample]:
    """`tokenize` for many examples in one tokenizer call per side (the fast tokenizer batches in Rust).
    Chat examples (with messages) are rendered with `chat_template` (data.chat_template) into one row of at
    most source_max_len + target_max_len tokens (see tokenize_chats)."""
    out: list[TokenizedExample | None] = [None] * len(examples)
    for chat, tokenize_some in ((False, _tokenize_pairs), (True, tokenize_chats)):
        index = [i for i, e in enumerate(examples) if bool(e.messages) == chat]
        if index:
            rows = tokenize_some([examples[i] for i in index], tokenizer, source_max_len, target_max_len,
                                 train_on_source, chat_template)
            for i, row in zip(index, rows):
                out[i] = row
    return out


def _tokenize_pairs(examples: list[Example], tokenizer, source_max_len: int, target_max_len: int,
                    train_on_source: bool, _chat_template: str = "") -> list[TokenizedExample]:
    bos = tokenizer.bos_token or ""
    # each side cut to its own length from the right: what the tokenizer's truncation gives without special
    # tokens (the same ids on 3,387 real rows, both built-in tokenizers, lengths 16/128/512)
    sources = [ids[:source_max_len] for ids in _encode(tokenizer, [bos + e.source for e in examples])]
    targets = [ids[:target_max_len] for ids in _encode(tokenizer, [e.target + tokenizer.eos_token for e in examples])]
    return [TokenizedExample(s + t, (list(s) if train_on_source else [IGNORE_INDEX] * len(s)) + t)
            for s, t in zip(sources, targets)]


# ------------------------------------------------------------------------------------------- chat rows
# A conversation becomes exchanges (user turn with whatever precedes it, then the assistant's answer and its
# end-of-turn token), each a list of (token ids, trained) pieces; a row keeps the exchanges that fit.
Exchange = list[tuple[list[int], bool]]


def tokenize_chats(examples: list[Example], tokenizer, source_max_len: int, target_max_len: int,
                   train_on_source: bool, chat_template: str = "guanaco", exact: bool = False) -> list[TokenizedExample]:
    """One row per conversation: labels on the assistant turns (each with its end-of-turn token), the rest
    masked unless train_on_source. Too long a conversation loses whole exchanges from the end; when not
    even the first fits in source_max_len + target_max_len tokens, the row is skipped ('too_long').
    `exact`: the tokenizer's template split by tokenizing every prefix (the reference the fast split is
    checked against: tests/test_chat_data.py, bench/chat_tokenize.py)."""
    conversations = [e.messages for e in examples]
    if chat_template == "guanaco":
        split = _guanaco_exchanges(conversations, tokenizer)
    else:
        split = _template_exchanges(conversations, tokenizer, fast=not exact)
    budget = source_max_len + target_max_len
    return [TokenizedExample([], [], skip="template_mismatch") if exchanges is None
            else _fit(exchanges, budget, train_on_source) for exchanges in split]


def _fit(exchanges: list[Exchange], budget: int, train_on_source: bool) -> TokenizedExample:
    ids: list[int] = []
    labels: list[int] = []
    for exchange in exchanges:
        if len(ids) + sum(len(p) for p, _ in exchange) > budget:
            break
        for piece, trained in exchange:
            ids += piece
            labels += piece if trained or train_on_source else [IGNORE_INDEX] * len(piece)
    return TokenizedExample(ids, labels) if ids else TokenizedExample([], [], skip="too_long")


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of texts, no special tokens added: the fast tokenizer's Rust batch when there is one, as
    transformers (5.24) calls it, without its per-text conversion to Python objects (3x the encoding)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not texts:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def _guanaco_exchanges(conversations: list[tuple[Message, ...]], tokenizer) -> list[list[Exchange]]:
    """prompts.guanaco_segments with EOS after each answer, BOS first (as the seed's rows); all pieces of
    all conversations tokenized in one call."""
    segments = [guanaco_segments(c, end=tokenizer.eos_token) for c in conversations]
    bos = tokenizer.bos_token or ""
    texts = [(bos if k == 0 else "") + text for seg in segments for k, (text, _) in enumerate(seg)]
    ids = iter(_encode(tokenizer, texts))
    out = []
    for seg in segments:
        pieces = [(next(ids), trained) for _, trained in seg]
        # An exchange: the user piece, then the answer and EOS pieces (guanaco_segments' order).
        out.append([pieces[k:k + 3] for k in range(0, len(pieces), 3)])
    return out


# Conversations by how _template_exchanges found their turns' token bounds: "fast" (one encoding of the whole
# conversation) or "exact" (every prefix tokenized: asked for, or the fast split could not vouch for them).
TEMPLATE_SPLITS: Counter = Counter()


def _template_exchanges(conversations: list[tuple[Message, ...]], tokenizer, fast: bool = True) -> list[list[Exchange]]:
    """The tokenizer's chat template, split per turn by rendering prefixes: the conversation up to an
    answer (with the generation prompt) and up to the answer's end. Their token counts delimit the answer;
    its trained part ends at its last special token (the template's end-of-turn token, e.g. <|im_end|>),
    so what the template puts after it (a line break) is masked. Each prefix's tokens must begin the whole
    conversation's tokens, i.e. the last prefix's (the conversation ends with an answer; checked here for
    every row): a template that renders earlier turns differently once later turns follow, or a merge of
    tokens across a turn's boundary, would make the masks wrong. Tokenizing every prefix costs about as
    many tokens as there are turns times the conversation's; the fast split (_fast_bounds) tokenizes the
    whole conversation once and each prefix's last few characters, with the same ids and bounds."""
    if fast:
        prefixes = _rendered_prefixes(conversations, tokenizer)
        found = _fast_bounds(prefixes, tokenizer)
    else:
        prefixes = [_template_prefixes(conv, tokenizer) for conv in conversations]
        found = [None] * len(prefixes)
    slow = [i for i, bounds in enumerate(found) if bounds is None]
    for i, bounds in zip(slow, _exact_bounds([prefixes[i] for i in slow], tokenizer)):
        found[i] = bounds
    TEMPLATE_SPLITS.update(fast=len(found) - len(slow), exact=len(slow))
    special = special_ids(tokenizer)
    return [None if bounds is None else _split_turns(*bounds, special) for bounds in found]


def _template_prefixes(conv: tuple[Message, ...], tokenizer) -> list[str]:
    """For each answer: the conversation up to it with the generation prompt, and up to its end."""
    from jinja2 import TemplateError

    try:
        return [template_text(tokenizer, conv[:i + end], generation_prompt=not end)
                for i, m in enumerate(conv) if m.role == "assistant" for end in (0, 1)]
    except TemplateError as exc:  # e.g. a template that refuses system messages
        raise ConfigError([f"data.chat_template=tokenizer: the chat template of {tokenizer.name_or_path} "
                           f"refused a conversation: {exc}"]) from None


def _rendered_prefixes(conversations: list[tuple[Message, ...]], tokenizer) -> list[list[str]]:
    """_template_prefixes of every conversation, rendered as apply_chat_template renders a batch of chats
    (transformers 5.24: render_jinja_template with the special tokens; its per-chat conversion of message
    objects is left out, our messages being plain strings already): 1.5x faster on HH-RLHF's dialogues."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    chats = [[{"role": m.role, "content": m.content} for m in conv] for conv in conversations]
    answers = [[i for i, m in enumerate(conv) if m.role == "assistant"] for conv in conversations]
    template, names = tokenizer.get_chat_template(), tokenizer.special_tokens_map
    if any(0 in ii for ii in answers):  # an answer first: apply_chat_template refuses its empty prefix
        return [_template_prefixes(conv, tokenizer) for conv in conversations]
    try:
        upto, ends = [render_jinja_template([chat[:i + end] for chat, ii in zip(chats, answers) for i in ii],
                                            chat_template=template, add_generation_prompt=not end, **names)[0]
                      for end in (0, 1)]
    except TemplateError:  # the error of the conversation the exact path would have stopped at
        return [_template_prefixes(conv, tokenizer) for conv in conversations]
    out, k = [], 0
    for ii in answers:
        out.append([text for pair in zip(upto[k:k + len(ii)], ends[k:k + len(ii)]) for text in pair])
        k += len(ii)
    return out


def _exact_bounds(prefix_lists: list[list[str]], tokenizer) -> list[tuple[list[int], list[int]] | None]:
    """(the whole conversation's ids, each prefix's token count), every prefix tokenized; None for a
    conversation whose prefixes' ids do not begin the whole conversation's. That row is skipped and counted
    ('template_mismatch'), not the dataset refused: SmolLM2's template, for one, trims an answer's leading
    line break only once a later turn follows, so one such answer would otherwise stop a whole ShareGPT
    file. A template that mismatches every row leaves no example, which the loader reports with the count."""
    ids = _encode(tokenizer, [text for texts in prefix_lists for text in texts])  # the template spells out BOS
    out, k = [], 0
    for texts in prefix_lists:
        prefixes, k = ids[k:k + len(texts)], k + len(texts)
        full = prefixes[-1]
        out.append(None if any(full[:len(p)] != p for p in prefixes) else (full, [len(p) for p in prefixes]))
    return out


def _fast_bounds(prefix_lists: list[list[str]], tokenizer) -> list[tuple[list[int], list[int]] | None]:
    """_exact_bounds' answer from one encoding of each whole conversation, or None for a conversation to
    leave to _exact_bounds. A fast tokenizer cuts text at its added tokens (<|im_start|>, <|im_end|>, <s>)
    before anything else and encodes the pieces apart, so a prefix that is a character prefix of the whole
    text encodes as the whole text's ids up to the prefix's last added token (none straddling the prefix's
    end), then the ids of the rest, its tail (ChatML: a line break, or 'assistant' and one). Each distinct
    tail is encoded once, and its ids must be the whole text's ids there (the exact path's check). The
    encoding skips offsets (encode_batch_fast: ~10% less CPU on SmolLM2), so the added tokens are found
    in the text by a leftmost-longest search, which must find the encoding's added ids, in order."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    added = {i: t for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    # Added tokens that strip spaces, match whole words only or after normalization are not found by a
    # plain search; ids that depend on the batch (padding, truncation left on) have no safe cut.
    if (backend is None or not added or backend.padding or backend.truncation
            or any(t.lstrip or t.rstrip or t.single_word or t.normalized for t in added.values())):
        return [None] * len(prefix_lists)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    contents = {i: t.content for i, t in added.items()}
    finder = re.compile("|".join(map(re.escape, sorted(set(contents.values()), key=len, reverse=True))))
    fulls = [e.ids for e in encode([texts[-1] for texts in prefix_lists], add_special_tokens=False)]
    plans = [_tails(texts, ids, contents, finder) for texts, ids in zip(prefix_lists, fulls)]
    tails = sorted({tail for plan in plans if plan for _, tail in plan[1]})
    tail_ids = dict(zip(tails, (e.ids for e in encode(tails, add_special_tokens=False))))
    return [plan and _check_tails(*plan, tail_ids) for plan in plans]


def _tails(texts: list[str], ids: list[int], contents: dict[int, str], finder: re.Pattern):
    """The whole text's ids and, for each other prefix, (the ids before its last added token, its tail's
    text); None where the prefixes or the added tokens do not line up."""
    full = texts[-1]
    if not all(full.startswith(text) for text in texts[:-1]):
        return None
    found = [(m.start(), m.end(), m.group()) for m in finder.finditer(full)]
    marks = [j for j, i in enumerate(ids) if i in contents]
    if [text for _, _, text in found] != [contents[ids[j]] for j in marks]:
        return None
    pieces = []
    for text in texts[:-1]:
        before, cut_at = 0, 0
        for (start, end, _), j in zip(found, marks):
            if end > len(text):
                if start < len(text):  # an added token across the prefix's end: the prefix cuts it apart
                    return None
                break
            before, cut_at = j + 1, end
        pieces.append((before, text[cut_at:]))
    return ids, pieces


def _check_tails(ids: list[int], pieces: list[tuple[int, str]], tail_ids: dict[str, list[int]]):
    bounds = []
    for before, tail in pieces:
        tail = tail_ids[tail]
        if ids[before:before + len(tail)] != tail:
            return None
        bounds.append(before + len(tail))
    return ids, bounds + [len(ids)]


def _split_turns(full: list[int], bounds: list[int], special: set[int]) -> list[Exchange]:
    exchanges, done = [], 0
    for start, end in zip(bounds[0::2], bounds[1::2]):
        last = max((j for j in range(start, end) if full[j] in special), default=end - 1)  # end-of-turn token
        exchanges.append([(full[done:start], False), (full[start:last + 1], True), (full[last + 1:end], False)])
        done = end
    return exchanges


def special_ids(tokenizer) -> set[int]:
    """Ids of the special tokens (BOS/EOS/pad and the added ones marked special, e.g. <|im_end|>, <|eot_id|>)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


def end_of_turn_id(tokenizer, chat_template: str) -> int:
    """The token that ends an assistant turn (generate's stop token): EOS for guanaco; for the tokenizer's
    template, the one training rows end answers with (found by rendering a probe conversation)."""
    if chat_template == "guanaco":
        return tokenizer.eos_token_id
    probe = (Message("user", "Hi"), Message("assistant", "Hello"))
    [[_, (answer, _), _]] = _template_exchanges([probe], tokenizer)[0]  # one exchange: prompt, answer, after
    return answer[-1]


def drop_skipped(rows: list[TokenizedExample], counts: dict[str, int]) -> list[TokenizedExample]:
    """The rows to train on; skipped ones are counted by reason into `counts`."""
    for r in rows:
        if r.skip is not None:
            counts[r.skip] = counts.get(r.skip, 0) + 1
    return [r for r in rows if r.skip is None]


def show_row(row: TokenizedExample, tokenizer) -> str:
    """A row as text with its trained spans in [[...]] (data preview)."""
    if row.skip is not None:
        return f"(skipped: {row.skip})"
    parts, start = [], 0
    for end in range(1, len(row.input_ids) + 1):
        trained = row.labels[start] != IGNORE_INDEX
        if end == len(row.input_ids) or (row.labels[end] != IGNORE_INDEX) != trained:
            text = tokenizer.decode(row.input_ids[start:end])
            parts.append(f"[[{text}]]" if trained else text)
            start = end
    return "".join(parts)


def tokenize_all(examples: list[Example], tokenizer, cfg: Config) -> list[TokenizedExample]:
    d, out = cfg.data, []
    for start in range(0, len(examples), 1024):
        out += tokenize_batch(examples[start:start + 1024], tokenizer, d.source_max_len, d.target_max_len,
                              d.train_on_source, chat_template=d.chat_template)
    return out


def pack(rows: list[TokenizedExample], length: int, seed: int, open_bins: int = 64) -> list[TokenizedExample]:
    """Several examples per row of at most `length` tokens. Examples are taken in a seeded order and
    each goes into the first of the last `open_bins` rows with room for it (first fit over a bounded
    window: near-full rows at linear cost). Position ids restart for every example, which makes
    transformers' attention block-diagonal (its masking utils find packed sequences from the position
    ids when there is no 2D attention mask and no KV cache: training runs with use_cache=False, see
    model.prepare_for_training). Each example's first label is masked: it would otherwise be predicted
    from the previous example's last token, which an unpacked row never does."""
    bins = pack_bins([len(r.input_ids) for r in rows], length, seed, open_bins)
    return [_concat([rows[i] for i in b], length) for b in bins]


def pack_bins(lengths: list[int], length: int, seed: int, open_bins: int = 64) -> list[list[int]]:
    """`pack`'s plan from the rows' lengths alone (the cache packs rows it never holds all at once): the
    indices of the rows of each packed row, in order."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    done: list[list[int]] = []
    bins: list[list[int]] = []
    used: list[int] = []
    for i in order:
        n = min(lengths[i], length)
        k = next((k for k, u in enumerate(used) if u + n <= length), None)
        if k is None:
            if len(bins) == open_bins:  # close the fullest row to keep the window bounded
                k = max(range(len(bins)), key=used.__getitem__)
                done.append(bins.pop(k))
                used.pop(k)
            bins.append([])
            used.append(0)
            k = len(bins) - 1
        bins[k].append(i)
        used[k] += n
    return done + bins


def _concat(members: list[TokenizedExample], length: int) -> TokenizedExample:
    ids, labels, positions = [], [], []
    for r in members:
        ids += r.input_ids[:length]
        labels += [IGNORE_INDEX] + r.labels[1:length]
        positions += list(range(min(len(r.input_ids), length)))
    return TokenizedExample(ids, labels, positions)


def collate(rows: list[TokenizedExample], pad_id: int, multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padding never counts in the loss. Unpacked rows mask padding out
    of attention; packed rows carry position ids instead (the padding is one more short sequence).
    `multiple_of` > 1 (dist.sequence_parallel): the width is padded up to a multiple of it, so that the
    ranks of a group get equal slices of whole rows, and unpacked rows carry their position ids too
    (Ulysses gathers them to rebuild each row's positions: model/loss.py shard_for_group)."""
    width = -(-max(len(r.input_ids) for r in rows) // multiple_of) * multiple_of
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
    if rows[0].position_ids is None and multiple_of == 1:
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if rows[0].position_ids is None:
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}
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
