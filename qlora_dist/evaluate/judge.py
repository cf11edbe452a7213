"""`eval judge`: a 10-point review of each answer against ChatGPT's, in both presentation orders, by an
OpenAI-compatible chat endpoint (GPT-4 in the paper; a local vLLM or llama.cpp server serves as well).

- The request is the authors' (evaluate/bench_files.JudgePrompt): the question's category picks the
  general, coding or math prompt, with its temperature and max tokens from `reviewer.jsonl`.
- The client is the `openai` package's, reading OPENAI_BASE_URL and OPENAI_API_KEY. Its own retry
  handles 429, 408/409, 5xx and dropped connections with exponential backoff (honouring Retry-After);
  a request that still fails ends the run as a RunFault naming the question and order.
- Requests are spaced to at most --requests-per-minute, from --workers threads.
- Every answered request is cached on disk (cache/<sha256 of the request>.json, written atomically) before
  it counts: a rerun asks nothing twice, a killed run resumes where it stopped.
- The score line is parsed as the authors' `parse_score` did (the first line, commas as spaces, exactly
  two numbers; else [-1, -1], which scoring drops and counts).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qlora_dist import atomic
from qlora_dist.errors import ConfigError, RunFault
from qlora_dist.evaluate.bench_files import Answer, JudgePrompt

ORDERS = ("chatgpt_first", "system_first")  # the review files' names, one per presentation order
SHORTUUID_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def parse_score(text: str) -> list[float]:
    """[Assistant 1, Assistant 2] from the review's first line, or [-1, -1] (the authors' rule)."""
    parts = text.split("\n", 1)[0].replace(",", " ").split(" ")
    try:
        if len(parts) == 2:
            return [float(parts[0]), float(parts[1])]
    except ValueError:
        pass
    return [-1, -1]


@dataclass(frozen=True)
class Request:
    question_id: object
    order: str          # one of ORDERS
    first: Answer
    second: Answer
    prompt: JudgePrompt
    messages: list

    def body(self, model: str) -> dict:
        return {"model": model, "messages": self.messages, "temperature": self.prompt.temperature,
                "max_tokens": self.prompt.max_tokens}


def build_requests(questions, answers: dict[object, Answer], reference: dict[object, Answer],
                   prompts: dict[str, JudgePrompt]) -> list[Request]:
    """Two requests per question: ChatGPT's answer shown first, then the system's first."""
    out = []
    for q in questions:
        prompt = prompts.get(q.category or "general", prompts["general"])
        system, chatgpt = answers[q.question_id], reference[q.question_id]
        for order, (first, second) in zip(ORDERS, ((chatgpt, system), (system, chatgpt))):
            out.append(Request(q.question_id, order, first, second, prompt,
                               prompt.messages(q.turns[0], first.text, second.text)))
    return out


class ReviewCache:
    """One file per answered request, named by the hash of what was asked (model, messages, sampling)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, body: dict) -> Path:
        key = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        return self.folder / f"{key}.json"

    def get(self, body: dict) -> dict | None:
        path = self.path(body)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def put(self, body: dict, text: str) -> dict:
        entry = {"review_id": "".join(secrets.choice(SHORTUUID_ALPHABET) for _ in range(22)), "text": text,
                 "model": body["model"]}
        atomic.write_text(self.path(body), json.dumps(entry, ensure_ascii=False))
        return entry


class RateLimit:
    """At most `per_minute` requests started per minute, across threads (0: no limit)."""

    def __init__(self, per_minute: float):
        self.gap = 60.0 / per_minute if per_minute > 0 else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.gap
        time.sleep(max(0.0, start - now))


def make_client(max_retries: int = 6, timeout_s: float = 600.0):
    """The openai client for OPENAI_BASE_URL (default: OpenAI's API) with OPENAI_API_KEY."""
    import openai

    if not os.environ.get("OPENAI_API_KEY"):
        raise ConfigError(["OPENAI_API_KEY is not set (the judge's key; a local server accepts any value, "
                           "with OPENAI_BASE_URL=http://host:port/v1)"])
    return openai.OpenAI(max_retries=max_retries, timeout=timeout_s)


def _ask(client, model: str, request: Request, cache: ReviewCache, limit: RateLimit) -> tuple[dict, bool]:
    """(the cached review of the request, whether it was asked now)."""
    import openai

    body = request.body(model)
    if (entry := cache.get(body)) is not None:
        return entry, False
    limit.wait()
    try:
        reply = client.chat.completions.create(**body)
    except openai.APIError as exc:
        status = getattr(exc, "status_code", None)
        raise RunFault(f"judge {model}: question {request.question_id!r} ({request.order}): "
                       f"{f'HTTP {status}: ' if status else ''}{exc.message} (after the client's retries; "
                       "the reviews so far are cached, the same command continues)") from None
    return cache.put(body, reply.choices[0].message.content or ""), True


def run_judge(requests: list[Request], model: str, out: Path, client, workers: int = 4,
              per_minute: float = 60.0, progress: bool = True) -> tuple[dict[str, Path], int]:
    """Ask (or read from the cache) every request; write one review file per order into `out` in the
    authors' schema. Returns (order -> file, requests asked now)."""
    from tqdm import tqdm

    cache, limit = ReviewCache(out / "cache"), RateLimit(per_minute)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(requests), desc=f"judge {model}", unit="review", disable=not progress) as bar:
        futures = [pool.submit(_ask, client, model, r, cache, limit) for r in requests]
        results = []
        try:
            for future in futures:
                results.append(future.result())
                bar.update(1)
        except BaseException:
            for future in futures:  # stop asking; what was answered stays cached
                future.cancel()
            raise
    files = {order: out / f"{order}.jsonl" for order in ORDERS}
    for order, path in files.items():
        rows = [_review_row(r, entry) for r, (entry, _) in zip(requests, results) if r.order == order]
        atomic.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return files, sum(asked for _, asked in results)


def _review_row(request: Request, entry: dict) -> dict:
    return {"review_id": entry["review_id"], "question_id": request.question_id,
            "answer1_id": request.first.answer_id, "answer2_id": request.second.answer_id,
            "reviewer_id": request.prompt.prompt_id, "metadata": {"judge": entry["model"]},
            "text": entry["text"], "score": parse_score(entry["text"])}
