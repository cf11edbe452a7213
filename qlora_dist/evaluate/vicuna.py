"""`eval vicuna`: a system's answers to the Vicuna benchmark's 80 questions, the first step of the paper's
chatbot benchmark (then `eval judge`, `eval score`).

The generation is `generate --prompts`' (evaluate/generate.answer_batch), with the paper's sampling
(nucleus p=0.9, temperature 0.7) by default. What makes it a benchmark step:

- Answers do not depend on the number of ranks: the questions are cut into fixed batches of
  --batch-size consecutive questions, and each batch samples from its own seed, a function of --seed and
  the batch's first question only. Batches are dealt to ranks round by round (batch b to rank
  b % world_size within a round); rank 0 appends each round's answers, in question order.
- Resumable: the answer file is the progress record. Each round's lines are appended whole (one write,
  atomic.append_lines); a rerun drops a last line a kill cut short, keeps every answer already written,
  and generates only the batches with a missing answer (a batch is regenerated whole, so its sampling is
  the uninterrupted run's). When all are there, the file is rewritten in question order.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_dist import atomic, dist
from qlora_dist.errors import ConfigError
from qlora_dist.evaluate.bench_files import Question
from qlora_dist.evaluate.generate import answer_batch, answer_records

PAPER_TEMPERATURE, PAPER_TOP_P = 0.7, 0.9  # the sampling of the authors' generation files


@dataclass(frozen=True)
class Sampling:
    seed: int
    batch_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    chat_template: str


def batch_seed(seed: int, first: int) -> int:
    """The sampling seed of the batch starting at question index `first` (unique per (seed, first))."""
    return seed * 1_000_003 + first


def _key(question_id) -> str:
    return json.dumps(question_id)  # ids are ints or strings; one key for both


def read_written(path: Path, questions: list[Question], option: str = "--out") -> dict[str, dict]:
    """The answers already in `path`, by question id (none if it does not exist). Only reads: a last line
    without its newline (what a kill left) is not counted; rank 0 cuts it off before appending
    (answer_missing). Any other line must be an answer to one of the questions."""
    if not path.is_file():
        return {}
    wanted = {_key(q.question_id) for q in questions}
    written, problems = {}, []
    for line, text in enumerate(path.read_text(encoding="utf-8").split("\n")[:-1], 1):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{line}: not valid JSON ({exc.msg}); not an answer file of these questions?")
            continue
        key = _key(record.get("question_id")) if isinstance(record, dict) else None
        if key not in wanted:
            problems.append(f"{path}:{line}: question_id {key} is not one of the questions ({option} holds the "
                            "answers to other questions? choose another file)")
            continue
        written[key] = record
    if problems:
        raise ConfigError(problems[:3])
    return written


def batches_to_answer(questions: list[Question], written: dict[str, dict], batch_size: int) -> list[range]:
    """The fixed batches (index ranges) that still miss an answer."""
    batches = [range(s, min(s + batch_size, len(questions))) for s in range(0, len(questions), batch_size)]
    return [b for b in batches if any(_key(questions[i].question_id) not in written for i in b)]


def answer_missing(model, tokenizer, questions: list[Question], schema: str, written: dict[str, dict],
                   sampling: Sampling, out: Path, model_id: str, info: dist.DistInfo) -> int:
    """Generate the missing answers across ranks; rank 0 appends them to `out` round by round and at the
    end rewrites it in question order. Returns the number of answers written now."""
    from tqdm import tqdm

    todo = batches_to_answer(questions, written, sampling.batch_size)
    if info.is_main and out.is_file() and atomic.cut_partial_line(out):
        dist.log(f"{out}: dropped a last line that a kill cut short")
    bar = tqdm(total=len(todo), desc="vicuna answers", unit="batch", disable=not info.is_main)
    added = 0
    for start in range(0, len(todo), info.world_size):
        mine = todo[start + info.rank] if start + info.rank < len(todo) else None
        rows = _answer_one_batch(model, tokenizer, questions, schema, mine, sampling, model_id) if mine else []
        new = [r for part in dist.gather_objects(rows) for r in part if _key(r["question_id"]) not in written]
        if info.is_main and new:
            atomic.append_lines(out, [json.dumps(r, ensure_ascii=False) for r in new])
        written.update({_key(r["question_id"]): r for r in new})
        added += len(new)
        bar.update(min(info.world_size, len(todo) - start))
    bar.close()
    if info.is_main:
        ordered = [written[_key(q.question_id)] for q in questions]
        atomic.write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    return added


def _answer_one_batch(model, tokenizer, questions, schema, batch: range, sampling: Sampling, model_id) -> list[dict]:
    """One fixed batch, sampled from its own seed (see the module docstring)."""
    torch.manual_seed(batch_seed(sampling.seed, batch.start))
    chosen = [questions[i] for i in batch]
    answers = answer_batch(model, tokenizer, chosen, sampling.max_new_tokens, sampling.temperature, sampling.top_p,
                           len(chosen), sampling.chat_template)
    return answer_records(schema, chosen, answers, model_id)
