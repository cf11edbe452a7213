"""MMLU multiple choice, 0- and 5-shot: questions from the hendrycks CSV layout or qlora's JSON lines,
scored by the next-token logits of the four answer letters after "Answer:", sharded across ranks.

Prompts are byte-identical to the original ones (hendrycks/test `evaluate.py`, which qlora's
data/mmlu/*.json files were built with): "The following are multiple choice questions (with answers)
about  {subject words}." — two spaces, because hendrycks' format_subject puts a space before every word —
then the question, "\\nA. ..." per choice and "\\nAnswer:"; each shot ends " {letter}\\n\\n".

The prediction (as artidoro/qlora does) is the highest logit among the letter tokens at the position
after "Answer:". qlora takes `tokenizer("A").input_ids`; with LLaMA-1's SentencePiece that is "▁A", the
token that follows "Answer:" in "Answer: A". Byte-level BPE tokenizers (SmolLM2, the tiny test model)
give "A" for `tokenizer("A")` but "ĠA" in "Answer: A", so here the letter tokens are the ones the
tokenizer gives in context (see `letter_tokens`), which is "▁A" for LLaMA-1 again.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_dist.errors import ConfigError
from qlora_dist import dist

CHOICES = "ABCD"
SPLITS = ("val", "test")


@dataclass(frozen=True)
class Question:
    subject: str
    prompt: str  # ends with "Answer:"
    answer: str  # one of CHOICES
    where: str  # file:line, for messages


# ---------------------------------------------------------------------------------------------- reading
def format_subject(subject: str) -> str:
    return "".join(" " + word for word in subject.split("_"))


def format_example(row: list[str], with_answer: bool) -> str:
    """hendrycks' format_example: question, lettered choices, "Answer:" (and the answer for a shot)."""
    text = row[0] + "".join(f"\n{letter}. {choice}" for letter, choice in zip(CHOICES, row[1:5])) + "\nAnswer:"
    return text + (f" {row[5]}\n\n" if with_answer else "")


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"


def _read_csv_rows(path: Path, problems: list[str]) -> list[tuple[int, list[str]]]:
    """(line, row) of a hendrycks CSV: no header; question, four choices, answer letter."""
    rows = []
    reader = csv.reader(io.StringIO(_text(path), newline=""))  # as a file opened with newline=""
    line = 1
    for row in reader:
        if len(row) != 6:
            problems.append(f"{path}:{line}: expected 6 columns (question, choices A-D, answer letter), "
                            f"got {len(row)}")
        elif row[5].strip() not in CHOICES:
            problems.append(f"{path}:{line}: answer {row[5]!r} is not one of A, B, C, D")
        else:
            rows.append((line, [*row[:5], row[5].strip()]))
        line = reader.line_num + 1  # a quoted field may span lines: the next record starts here
    return rows


def _text(path: Path) -> str:
    """The file's text; a binary or otherwise non-UTF-8 file is an error naming it, not a traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not an MMLU text file (byte {exc.start} is not UTF-8)"]) from None


def _read_csv_layout(folder: Path, shots: int, split: str) -> list[Question]:
    files = sorted((folder / split).glob(f"*_{split}.csv"))
    if not files:
        raise ConfigError([f"{folder}: no {split}/*_{split}.csv files (the hendrycks MMLU layout: dev/, val/, test/)"])
    problems: list[str] = []
    questions = []
    for path in files:
        subject = path.name[: -len(f"_{split}.csv")]
        shot_text = ""
        if shots:
            dev = folder / "dev" / f"{subject}_dev.csv"
            if not dev.is_file():
                problems.append(f"{dev}: missing ({shots}-shot prompts take the dev split's first {shots} rows)")
                continue
            dev_rows = _read_csv_rows(dev, problems)
            if len(dev_rows) < shots:
                problems.append(f"{dev}: {len(dev_rows)} valid rows, fewer than the {shots} shots asked for")
            shot_text = "".join(format_example(row, True) for _, row in dev_rows[:shots])
        for line, row in _read_csv_rows(path, problems):
            questions.append(Question(subject, header(subject) + shot_text + format_example(row, False), row[5],
                                      f"{path}:{line}"))
    if problems:
        raise ConfigError(problems)
    return questions


def _read_jsonl(path: Path) -> list[Question]:
    """qlora's data/mmlu/*.json: one {subject, input, output} object per line (JSON lines despite the name)."""
    problems, questions = [], []
    for line, text in enumerate(_text(path).splitlines(), 1):
        if not text.strip():
            continue
        where = f"{path}:{line}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg}); expected one {{subject, input, output}} per line")
            continue
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("subject", "input", "output")):
            problems.append(f"{where}: expected string fields subject, input, output")
        elif record["output"].strip() not in CHOICES:
            problems.append(f"{where}: answer {record['output']!r} is not one of A, B, C, D")
        elif not record["input"].rstrip().endswith("Answer:"):
            problems.append(f"{where}: input does not end with 'Answer:'")
        else:
            questions.append(Question(record["subject"], record["input"].rstrip(), record["output"].strip(), where))
    if problems:
        raise ConfigError(problems)
    return questions


def read_questions(path: str | Path, shots: int = 5, split: str = "val", max_questions: int = 0) -> list[Question]:
    """A hendrycks folder (its `split`, with `shots` dev examples per prompt) or a qlora JSON-lines file
    (its shots are already in the prompts). max_questions > 0: that many, evenly spaced over the file, so
    every subject keeps its share (the original takes the first N, which is one or two subjects)."""
    path = Path(path)
    if path.is_dir():
        questions = _read_csv_layout(path, shots, split)
    elif path.is_file():
        questions = _read_jsonl(path)
    else:
        raise ConfigError([f"{path}: not found (an MMLU folder with dev/ val/ test/, or a JSON-lines file)"])
    if not questions:
        raise ConfigError([f"{path}: no questions"])
    if 0 < max_questions < len(questions):
        questions = [questions[i * len(questions) // max_questions] for i in range(max_questions)]
    return questions


# ---------------------------------------------------------------------------------------------- scoring
def letter_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(ids to append after a prompt ending in "Answer:", the id of each letter there).
    The letter is the token that ends "Answer: X"; a tokenizer that keeps the space apart ("Ġ", "A")
    gets the space appended to the prompt instead."""
    base = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    suffixes = []
    for letter in CHOICES:
        ids = tokenizer(f"Answer: {letter}", add_special_tokens=False)["input_ids"]
        if ids[: len(base)] != base or len(ids) == len(base):
            raise ConfigError([f"tokenizer: 'Answer: {letter}' does not extend the tokens of 'Answer:' ({ids} vs {base})"])
        suffixes.append(ids[len(base):])
    prefix = suffixes[0][:-1]
    if any(s[:-1] != prefix for s in suffixes) or len({s[-1] for s in suffixes}) != 4:
        raise ConfigError([f"tokenizer: the letters A-D after 'Answer:' are not four distinct single tokens: {suffixes}"])
    return prefix, [s[-1] for s in suffixes]


def _encode(tokenizer, questions: list[Question]) -> list[list[int]]:
    prefix, _ = letter_tokens(tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []  # as qlora: BOS + input
    encoded = tokenizer([q.prompt for q in questions], add_special_tokens=False)["input_ids"]
    return [bos + ids + prefix for ids in encoded]


@torch.no_grad()
def _next_token_logits(model, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """[batch, vocab] fp32 logits after each row's last token. Left padding, positions counted from
    each row's first real token (so a row's result does not depend on its batch mates' lengths), and
    only the last position's logits (the full [batch, length, vocab] would be GBs for 5-shot prompts)."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=False, logits_to_keep=1)
    return out.logits[:, -1, :].float().cpu()


def deal_batches(lengths: list[int], batch_size: int, rank: int, world_size: int) -> list[tuple[list[int], bool]]:
    """This rank's forward passes: (question indices, keep the result).

    The batches are fixed before sharding (questions sorted by length, cut into batches) and dealt to
    ranks round-robin, so each question is scored once, in the same batch, whatever the world size.
    Under ZeRO-3 every forward pass gathers parameters collectively, so every rank must run the same
    number of them: ranks short of batches rerun the first (shortest) one and drop its result."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    mine = batches[rank::world_size]
    per_rank = -(-len(batches) // world_size)
    return [(b, True) for b in mine] + [(batches[0], False)] * (per_rank - len(mine))


def predict(model, tokenizer, questions: list[Question], batch_size: int = 8, rank: int = 0,
            world_size: int = 1, check_stop=None) -> list[tuple[str, float]]:
    """(predicted letter, loss) per question, in question order, on every rank (see deal_batches).
    loss = cross-entropy of the correct letter's token over the whole vocabulary (the original's MMLU
    loss is the language-model loss of the answer too), one value per question. check_stop: called
    before every pass on every rank (equal counts: deal_batches); it may raise to end the evaluation."""
    from tqdm import tqdm

    _, letter_ids = letter_tokens(tokenizer)
    rows = _encode(tokenizer, questions)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    local = []
    passes = deal_batches([len(r) for r in rows], batch_size, rank, world_size)
    # A bar on rank 0 only; every rank runs the same number of passes (deal_batches).
    for batch, keep in tqdm(passes, desc="MMLU", unit="batch", leave=False, disable=rank != 0):
        if check_stop:
            check_stop()
        logits = _next_token_logits(model, [rows[i] for i in batch], pad_id)
        if not keep:
            continue  # a padding pass: result dropped
        gold = torch.tensor([letter_ids[CHOICES.index(questions[i].answer)] for i in batch])
        losses = torch.nn.functional.cross_entropy(logits, gold, reduction="none")
        picks = logits[:, letter_ids].argmax(-1)
        local += [(i, CHOICES[int(p)], float(l)) for i, p, l in zip(batch, picks, losses)]
    results: dict[int, tuple[str, float]] = {}
    for rank_results in dist.gather_objects(local):
        for i, letter, loss in rank_results:
            assert i not in results, f"question {i} scored twice"
            results[i] = (letter, loss)
    assert len(results) == len(questions), (len(results), len(questions))
    return [results[i] for i in range(len(questions))]


def summarize(questions: list[Question], predictions: list[tuple[str, float]]) -> dict:
    """Accuracy per subject, their mean (as the original reports), the accuracy over all questions, the
    mean loss, the always-most-common-answer baseline, and the predicted letters in question order."""
    subjects: dict[str, dict] = {}
    for q, (letter, loss) in zip(questions, predictions):
        s = subjects.setdefault(q.subject, {"correct": 0, "n": 0, "loss": 0.0})
        s["correct"] += int(letter == q.answer)
        s["n"] += 1
        s["loss"] += loss
    for s in subjects.values():
        s["accuracy"], s["loss"] = s["correct"] / s["n"], s["loss"] / s["n"]
    answers = [q.answer for q in questions]
    return {
        "accuracy": sum(s["accuracy"] for s in subjects.values()) / len(subjects),
        "micro_accuracy": sum(s["correct"] for s in subjects.values()) / len(questions),
        "loss": sum(loss for _, loss in predictions) / len(predictions),
        "n": len(questions),
        "majority_baseline": max(answers.count(c) for c in CHOICES) / len(answers),
        "subjects": dict(sorted(subjects.items())),
        "predictions": "".join(letter for letter, _ in predictions),
    }


def evaluate(model, tokenizer, questions: list[Question], batch_size: int = 8, rank: int = 0,
             world_size: int = 1, check_stop=None) -> dict:
    """The MMLU report of `model` on `questions` (identical on every rank); check_stop: see predict."""
    was_training = model.training
    model.eval()
    try:
        return summarize(questions, predict(model, tokenizer, questions, batch_size, rank, world_size, check_stop))
    finally:
        model.train(was_training)


def format_report(report: dict, title: str, per_subject: bool = True) -> str:
    lines = [title]
    if per_subject:
        lines += [f"  {name:<40} {100 * s['accuracy']:5.1f}%  ({s['correct']}/{s['n']})"
                  for name, s in report["subjects"].items()]
    lines.append(f"  mean over {len(report['subjects'])} subjects: {100 * report['accuracy']:.2f}%  "
                 f"(all {report['n']} questions: {100 * report['micro_accuracy']:.2f}%; loss {report['loss']:.4f}; "
                 f"always-most-common-answer baseline {100 * report['majority_baseline']:.1f}%)")
    return "\n".join(lines)
