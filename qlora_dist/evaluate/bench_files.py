"""The chatbot benchmark's files, read and checked (one home for their schemas; every problem a line
naming the file and line):

- questions: FastChat's `question.jsonl`, either schema (evaluate/generate.read_prompt_file), with each
  question's `category` (it picks the judge's prompt);
- answers: FastChat's answer schemas — eval table `{question_id, answer_id, text}` (ChatGPT's
  `answer_gpt35.jsonl`) or llm_judge `{question_id, answer_id, choices: [{turns: [...]}]}` (`eval vicuna`);
- reviews (the authors' schema, FastChat's): `{review_id, question_id, answer1_id, answer2_id,
  reviewer_id, metadata, text, score}`, `score` a pair [Assistant 1, Assistant 2] for the 10-point
  relative judge, one of 1 / 2 / 3 (first better / second better / tie) for the three-class one; -1 is a
  review whose verdict did not parse;
- the judge's prompts (the authors' `prompts/`: `reviewer.jsonl`, `vicuna_prompt_relative.jsonl`).

Which assistant was shown first is read from the answer ids, never from a file name: the authors' relative
review files are named the reverse of their presentation order (see tests/data/SOURCES.md).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qlora_dist.errors import ConfigError

REVIEW_KEYS = ("question_id", "answer1_id", "answer2_id", "score")
THREE_CLASS = {1: 1.0, 2: 0.0, 3: 0.5}  # the verdict -> the first assistant's result (a tie is half a win)
UNPARSED = -1


def read_jsonl(path: Path | str, option: str) -> list[tuple[int, dict]]:
    """(line number, record) of a JSON-lines file; a missing file, a line that is not a JSON object: errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{option}: {path}: file not found"])
    rows, problems = [], []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{line}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{path}:{line}: expected a JSON object")
            continue
        rows.append((line, record))
    if problems:
        raise ConfigError(problems[:5])
    if not rows:
        raise ConfigError([f"{option}: {path}: no records"])
    return rows


# FastChat's two question schemas: llm_judge {question_id, category, turns: [...]}, old eval table
# {question_id, text, category}.
@dataclass(frozen=True)
class Question:
    question_id: object
    turns: list[str]
    category: str | None = None  # the Vicuna benchmark's; it picks the judge's prompt


def read_prompt_file(path: str | Path, option: str = "--prompts") -> tuple[str, list[Question]]:
    """('llm_judge' or 'eval_table', questions) of a FastChat question.jsonl; one schema per file."""
    path = Path(path)
    problems, questions, schemas = [], [], set()
    for line, record in read_jsonl(path, option):  # each line a JSON object, or an error naming it
        turns = record.get("turns")
        if isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns):
            schemas.add("llm_judge")
        elif isinstance(record.get("text"), str):
            schemas.add("eval_table")
            turns = [record["text"]]
        else:
            problems.append(f"{path}:{line}: expected {{question_id, turns: [...]}} (llm_judge) or "
                            "{question_id, text} (FastChat eval table)")
            continue
        category = record.get("category")
        questions.append(Question(record.get("question_id", line), turns, category if isinstance(category, str) else None))
    if len(schemas) > 1:
        problems.append(f"{path}: mixes the llm_judge (turns) and eval-table (text) schemas")
    if problems:
        raise ConfigError(problems)
    return schemas.pop(), questions


@dataclass(frozen=True)
class Answer:
    answer_id: str
    text: str
    where: str  # file:line


def _answer_of(record: dict) -> tuple[str, str] | None:
    """(answer_id, first turn's text) in either FastChat answer schema, None if neither."""
    choices = record.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        turns = choices[0].get("turns")
        text = turns[0] if isinstance(turns, list) and turns else None
    else:
        text = record.get("text")
    answer_id = record.get("answer_id")
    if isinstance(text, str) and isinstance(answer_id, str) and answer_id and "question_id" in record:
        return answer_id, text
    return None


def read_answers(path: Path | str, option: str, question_ids: list | None = None,
                 others_ok: bool = False) -> dict[object, Answer]:
    """Each question's answer; with question_ids, every question must have one (a reference with missing
    ids is refused, naming them) and, unless others_ok (a reference may answer more), every answer must
    belong to one of those questions."""
    answers, problems = {}, []
    wanted = None if question_ids is None else set(question_ids)
    for line, record in read_jsonl(path, option):
        found = _answer_of(record)
        if found is None:
            problems.append(f"{path}:{line}: not an answer (expected {{question_id, answer_id, text}} or "
                            "{question_id, answer_id, choices: [{turns: [...]}]})")
            continue
        qid = record["question_id"]
        if wanted is not None and qid not in wanted:
            if others_ok:
                continue
            problems.append(f"{path}:{line}: question_id {qid!r} is not one of the questions")
        elif qid in answers:
            problems.append(f"{path}:{line}: a second answer to question_id {qid!r} (first at {answers[qid].where})")
        else:
            answers[qid] = Answer(found[0], found[1], f"{path}:{line}")
    if wanted is not None and (missing := [q for q in question_ids if q not in answers]):
        problems.append(f"{option}: {path} has no answer to question_id(s) {_few(missing)}")
    if problems:
        raise ConfigError(problems[:5])
    return answers


@dataclass(frozen=True)
class Review:
    question_id: object
    first_id: str   # answer1_id: the answer shown first
    second_id: str
    score: object   # [first, second] (relative) or 1 / 2 / 3 (three-class); -1 where unparsed
    where: str      # file:line


def read_reviews(path: Path | str, option: str, three_class: bool = False) -> list[Review]:
    """A review file of the 10-point relative judge (score a pair) or, with three_class, of the pairwise
    judge (score 1 / 2 / 3, or -1). Another schema is refused at its first line."""
    reviews = []
    for line, record in read_jsonl(path, option):
        where = f"{path}:{line}"
        if not all(k in record for k in REVIEW_KEYS):
            missing = ", ".join(k for k in REVIEW_KEYS if k not in record)
            raise ConfigError([f"{where}: not a judge review (no {missing}; expected {{review_id, question_id, "
                               "answer1_id, answer2_id, reviewer_id, text, score})"])
        score = record["score"]
        if three_class and not (type(score) is int and (score in THREE_CLASS or score == UNPARSED)):
            raise ConfigError([f"{where}: score {score!r} is not a three-class verdict (1, 2, 3, or -1 unparsed)"])
        if not three_class and not (isinstance(score, list) and len(score) == 2
                                    and all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in score)):
            raise ConfigError([f"{where}: score {score!r} is not a 10-point pair [Assistant 1, Assistant 2]"
                               + (" (a three-class review? use `eval elo`)" if type(score) is int else "")])
        reviews.append(Review(record["question_id"], str(record["answer1_id"]), str(record["answer2_id"]),
                              score, where))
    return reviews


@dataclass(frozen=True)
class JudgePrompt:
    prompt_id: int
    system: str
    template: str       # with {question}, {answer_1}, {answer_2} and the defaults' keys ({prompt})
    defaults: dict
    temperature: float
    max_tokens: int

    def messages(self, question: str, first: str, second: str) -> list[dict]:
        user = self.template.format(question=question, answer_1=first, answer_2=second, **self.defaults)
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


RELATIVE_PROMPTS = "vicuna_prompt_relative.jsonl"
REVIEWERS = "reviewer.jsonl"


def read_judge_prompts(folder: Path | str, option: str = "--prompts") -> dict[str, JudgePrompt]:
    """category -> the judge prompt for it (the authors' reviewer.jsonl maps categories 'general',
    'coding', 'math' to prompt ids, with temperature and max tokens; an unknown category is 'general')."""
    folder = Path(folder)
    prompts = {r["prompt_id"]: (line, r) for line, r in read_jsonl(folder / RELATIVE_PROMPTS, option)}
    chosen, problems = {}, []
    for line, reviewer in read_jsonl(folder / REVIEWERS, option):
        where = f"{folder / REVIEWERS}:{line}"
        meta = reviewer.get("metadata") or {}
        if reviewer.get("prompt_id") not in prompts or "category" not in reviewer:
            problems.append(f"{where}: needs a category and a prompt_id of {folder / RELATIVE_PROMPTS}")
            continue
        pline, p = prompts[reviewer["prompt_id"]]
        if not all(isinstance(p.get(k), str) for k in ("system_prompt", "prompt_template")):
            problems.append(f"{folder / RELATIVE_PROMPTS}:{pline}: needs system_prompt and prompt_template")
            continue
        chosen[reviewer["category"]] = JudgePrompt(p["prompt_id"], p["system_prompt"], p["prompt_template"],
                                                   p.get("defaults") or {}, float(meta.get("temperature", 0.2)),
                                                   int(meta.get("max_tokens", 1024)))
    if "general" not in chosen and not problems:
        problems.append(f"{folder / REVIEWERS}: no reviewer for the 'general' category")
    if problems:
        raise ConfigError(problems)
    return chosen


def _few(items: list, n: int = 8) -> str:
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")
