"""The chatbot benchmark without a model: the score relative to ChatGPT reproduced from the authors' own
GPT-4 reviews (tests/data/vicuna_bench/qlora_eval, see tests/data/SOURCES.md), Elo, the judge client
against a local OpenAI-compatible server, and one-line errors for bad files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SHARED_DATA, TEST_DATA

QLORA_EVAL = TEST_DATA / "vicuna_bench" / "qlora_eval"
REFERENCE = QLORA_EVAL / "answer_gpt35.jsonl"
GEN = "guanaco-vicuna-generations-topp0.9-temp0.7"


def review_file(size: str, chatgpt_first: bool) -> Path:
    """The authors' names are the reverse of the order: in `<model>-vs-gpt-3.5-…` ChatGPT is shown first."""
    name = f"{size}-{GEN}-vs-gpt-3.5-gpt4-reviewer.jsonl" if chatgpt_first else f"gpt-3.5-vs-{size}-{GEN}-gpt4-reviewer.jsonl"
    return QLORA_EVAL / name


def run_main(*args: str) -> int:
    from qlora_dist.cli import main

    return main(list(args))


# ------------------------------------------------------------------------------------- the seed's rows
def test_shipped_reviews_reproduce_the_seed_rows_for_guanaco_7b_and_13b(capsys):
    args = ["eval", "score", "--reference", str(REFERENCE), "--json", "--reviews"]
    for size in ("7b", "13b"):
        args += [f"Guanaco {size.upper()}={review_file(size, True)}", f"Guanaco {size.upper()}={review_file(size, False)}"]
    assert run_main(*args) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    # The paper's table (the seed card): ChatGPT first / Guanaco first / mean.
    assert [rows["Guanaco 7B"][k] for k in ("chatgpt_first", "system_first", "mean")] == [84.1, 89.8, 87.0]
    assert [rows["Guanaco 13B"][k] for k in ("chatgpt_first", "system_first", "mean")] == [87.3, 93.4, 90.4]
    assert all(r["n_reviews"] == 160 and r["n_unparsed"] == 0 for r in rows.values())
    # Ours, a percentile bootstrap over questions with seed 0 (the paper's intervals are wider).
    assert rows["Guanaco 7B"]["ci95"] == [82.1, 91.5] and rows["Guanaco 13B"]["ci95"] == [85.7, 94.7]


def test_order_is_read_from_the_ids_not_the_file_name(tmp_path):
    """The ChatGPT-first file, rewritten with the assistants swapped and saved under the ChatGPT-first name:
    its reviews now count as Guanaco-first ones (84.1 there), none as ChatGPT-first."""
    from qlora_dist.evaluate import bench_files, chatbot_score

    swapped = tmp_path / review_file("7b", True).name
    rows = []
    for line in review_file("7b", True).read_text().splitlines():
        r = json.loads(line)
        r["answer1_id"], r["answer2_id"], r["score"] = r["answer2_id"], r["answer1_id"], r["score"][::-1]
        rows.append(json.dumps(r))
    swapped.write_text("\n".join(rows) + "\n")
    reference = bench_files.read_answers(REFERENCE, "--reference")
    [row] = chatbot_score.score_systems([("7b", swapped)], reference)
    assert row["system_first"] == 84.1 and row["chatgpt_first"] is None and row["mean"] == 84.1
    [row] = chatbot_score.score_systems([("7b", review_file("7b", False))], reference)
    assert row["system_first"] == 89.8 and row["chatgpt_first"] is None


def test_unparsed_pairs_are_dropped_and_counted(tmp_path):
    from qlora_dist.evaluate import bench_files, chatbot_score

    lines = review_file("13b", False).read_text().splitlines()
    edited = []
    for i, line in enumerate(lines):
        r = json.loads(line)
        if i < 3:
            r["score"] = [-1, -1]
        edited.append(json.dumps(r))
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(edited) + "\n")
    reference = bench_files.read_answers(REFERENCE, "--reference")
    [row] = chatbot_score.score_systems([("13b", path)], reference)
    kept = [json.loads(x)["score"] for x in lines[3:]]
    assert row["n_reviews"] == 77 and row["n_unparsed"] == 3
    assert row["system_first"] == round(100 * sum(s[0] for s in kept) / sum(s[1] for s in kept), 1)


def test_report_table_json_and_plot(tmp_path):
    assert run_main("eval", "score", "--reference", str(REFERENCE), "--report", str(tmp_path / "report"),
                    "--reviews", f"7b={review_file('7b', True)}", f"7b={review_file('7b', False)}") == 0
    names = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert names == ["relative_to_chatgpt.json", "relative_to_chatgpt.png", "relative_to_chatgpt.txt"]
    assert "87.0%" in (tmp_path / "report" / "relative_to_chatgpt.txt").read_text()
    assert (tmp_path / "report" / "relative_to_chatgpt.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------------------------- bad input
def _error_of(capsys, *args: str) -> str:
    """The command's error lines (exit 2, no traceback: one line per problem)."""
    capsys.readouterr()
    assert run_main(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("qlora-dist: error: ") for line in err), err
    return "\n".join(err)


def test_bad_files_are_one_line_errors_naming_file_and_line(tmp_path, capsys):
    score = ["eval", "score", "--reference", str(REFERENCE), "--reviews"]
    # a review file of another schema: an answer file, and a three-class pairwise review
    err = _error_of(capsys, *score, f"x={QLORA_EVAL / 'answer_gpt35.jsonl'}")
    assert f"{REFERENCE}:1: not a judge review" in err
    pairwise = sorted((QLORA_EVAL / "pairwise_threeclass").glob("*.jsonl"))[0]
    assert f"{pairwise}:1: score 3 is not a 10-point pair" in _error_of(capsys, *score, f"x={pairwise}")
    # a reference with missing ids: the review of question 80 has no ChatGPT answer to compare with
    short_ref = tmp_path / "ref.jsonl"
    short_ref.write_text("".join(REFERENCE.read_text().splitlines(keepends=True)[:79]))
    err = _error_of(capsys, "eval", "score", "--reference", str(short_ref), "--reviews", f"x={review_file('7b', True)}")
    assert f"{review_file('7b', True)}:80: question_id 80 has no answer in the reference ({short_ref})" in err
    # a review whose ids match neither side
    other = tmp_path / "other.jsonl"
    rows = review_file("7b", False).read_text().splitlines()
    r = json.loads(rows[4])
    r["answer2_id"] = "notChatGPT"
    other.write_text("\n".join(rows[:4] + [json.dumps(r)]) + "\n")
    assert f"{other}:5: neither answer1_id" in _error_of(capsys, *score, f"x={other}")
    assert "is not NAME=FILE" in _error_of(capsys, *score, str(other))


def test_answers_must_match_the_questions(tmp_path, capsys):
    questions = REPO / "qlora_dist" / "evaluate" / "vicuna_bench" / "question.jsonl"
    answers = tmp_path / "answers.jsonl"
    rows = [{"question_id": q, "answer_id": f"a{q}", "model_id": "m", "choices": [{"index": 0, "turns": ["x"]}]}
            for q in range(1, 81)]
    rows[6]["question_id"] = 81
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.environ.setdefault("OPENAI_API_KEY", "unused")
    err = _error_of(capsys, "eval", "judge", "--questions", str(questions), "--answers", str(answers), "--reference",
                    str(REFERENCE), "--judge-model", "m", "--out", str(tmp_path / "reviews"))
    assert f"{answers}:7: question_id 81 is not one of the questions" in err
    assert f"--answers: {answers} has no answer to question_id(s) 7" in err
    # and eval vicuna refuses to continue an answer file of other questions (before any model loads)
    from qlora_dist.evaluate import bench_files, vicuna

    _, qs = bench_files.read_prompt_file(questions)
    from qlora_dist.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{answers}:7: question_id 81 is not one of the questions"):
        vicuna.read_written(answers, qs)
    # a reference with missing ids, for the judge: named with the ids it lacks
    rows[6]["question_id"] = 7
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    short_ref = tmp_path / "ref.jsonl"
    short_ref.write_text("".join(REFERENCE.read_text().splitlines(keepends=True)[:78]))
    err = _error_of(capsys, "eval", "judge", "--questions", str(questions), "--answers", str(answers), "--reference",
                    str(short_ref), "--judge-model", "m", "--out", str(tmp_path / "reviews"))
    assert err == f"qlora-dist: error: --reference: {short_ref} has no answer to question_id(s) 79, 80"


# -------------------------------------------------------------------------------------------------- Elo
def _tournament(folder: Path, results: dict[tuple[str, str], int], questions: int = 6) -> Path:
    """Pairwise files in the authors' naming; answer ids '<system>-<q>'; the file named A-vs-B shows B first
    on odd questions (the order must come from the ids)."""
    folder.mkdir()
    for (a, b), score in results.items():
        rows = []
        for q in range(1, questions + 1):
            first, second, s = (a, b, score) if q % 2 == 0 else (b, a, {1: 2, 2: 1, 3: 3}[score])
            rows.append({"review_id": f"r{q}", "question_id": q, "answer1_id": f"{first}-{q}",
                         "answer2_id": f"{second}-{q}", "reviewer_id": 1, "metadata": {}, "text": "...", "score": s})
        (folder / f"{a}-vs-{b}-gpt-4-reviewer-threeclass.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_elo_is_deterministic_for_a_seed_and_the_winner_of_every_match_ranks_first(tmp_path):
    from qlora_dist.evaluate import chatbot_score as cs

    systems = ["alpha", "beta", "gamma", "delta"]
    # beta beats everyone (as first-named or second-named: score 2 means the second shown wins)
    results = {(a, b): (1 if a == "beta" else 2 if b == "beta" else 3) for a in systems for b in systems if a != b}
    matches = cs.read_tournament(_tournament(tmp_path / "t", results))
    one, two = cs.elo(matches, 300, seed=5), cs.elo(matches, 300, seed=5)
    assert np.array_equal(one, two) and not np.array_equal(one, cs.elo(matches, 300, seed=6))
    table = cs.elo_table(matches, one)
    assert table[0]["system"] == "beta" and table[0]["elo"] > 1100
    # ties among the others: they share the rest, each below the start
    assert all(r["elo"] < 1000 for r in table[1:])
    assert abs(sum(r["elo"] for r in table) - 4000) < 1e-6  # Elo moves points, never makes them


def test_elo_of_the_shipped_tournament_cut_reads_the_order_from_the_ids(capsys):
    from qlora_dist.evaluate import chatbot_score as cs

    matches = cs.read_tournament(QLORA_EVAL / "pairwise_threeclass")
    assert len(matches.systems) == 8 and len(matches.result) == 56 * 5 and matches.unparsed == 0
    # In these files the name order is the presentation order (unlike the relative reviews'): the ids agree.
    firsts = [matches.systems[i] for i in matches.first]
    names = [f.name.split("-vs-")[0] for f in sorted((QLORA_EVAL / "pairwise_threeclass").glob("*.jsonl")) for _ in range(5)]
    assert firsts == names
    assert run_main("eval", "elo", "--pairwise", str(QLORA_EVAL / "pairwise_threeclass"), "--orderings", "200") == 0
    assert capsys.readouterr().out.splitlines()[2].split()[1:3] == ["GPT-4", "1352.2"]


@pytest.mark.skipif(not (SHARED_DATA / "vicuna_bench" / "qlora_eval" / "pairwise_threeclass").is_dir(),
                    reason="the whole tournament (56 files, 6 MB) is only in ../shared/data/vicuna_bench")
def test_elo_of_the_whole_tournament_as_in_the_readme(capsys):
    assert run_main("eval", "elo", "--pairwise", str(SHARED_DATA / "vicuna_bench" / "qlora_eval" / "pairwise_threeclass"),
                    "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["system"], r["elo"]) for r in rows] == README_ELO


README_ELO = [("GPT-4", 1374.7), ("Guanaco 65B", 1022.1), ("Guanaco 33B", 989.1), ("Vicuna 13B", 971.4),
              ("ChatGPT", 963.4), ("Guanaco 13B", 910.4), ("Bard", 895.9), ("Guanaco 7B", 872.8)]


def test_pairwise_ids_that_match_neither_side_are_refused(tmp_path, capsys):
    folder = _tournament(tmp_path / "t", {(a, b): 1 for a in "wxyz" for b in "wxyz" if a != b})
    path = folder / "x-vs-y-gpt-4-reviewer-threeclass.jsonl"
    rows = path.read_text().splitlines()
    r = json.loads(rows[2])
    r["answer2_id"] = "z-3"
    path.write_text("\n".join(rows[:2] + [json.dumps(r)] + rows[3:]) + "\n")
    err = _error_of(capsys, "eval", "elo", "--pairwise", str(folder))
    assert f"{path}:3: the ids" in err and "match neither side (x, y)" in err


# ------------------------------------------------------------------------------------------- the judge
class StandInForGPT4(BaseHTTPRequestHandler):
    """A local OpenAI-compatible chat endpoint standing in for GPT-4: fixed reviews (the system 7, ChatGPT
    8; no score line for question 68), a 429 on the first request and a 500 on the third (both retried),
    and a hang on request `hang_at` (to kill the client mid-run)."""

    log: list[dict] = []
    answered: list[tuple] = []
    hang_at: int | None = None
    release = threading.Event()

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.log.append(body)
        n = len(cls.log)
        if n in (1, 3):  # a rate limit, then a server error: the client must retry both
            return self._send(429 if n == 1 else 500, {"error": {"message": "try again", "type": "x"}},
                              {"retry-after-ms": "10"})
        if cls.hang_at is not None and n == cls.hang_at:
            cls.release.wait(60)
            return
        user = body["messages"][1]["content"]
        key = _request_key(user)
        system_first = user.index("SYSTEM-ANSWER") < user.index("[The Start of Assistant 2's Answer]")
        text = ("The answers are comparable." if key[0] == 68 else ("7 8" if system_first else "8 7") + "\nbecause")
        cls.answered.append(key)
        self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def _send(self, code, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(code)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


def _request_key(user: str) -> tuple[int, bool]:
    """(question id, system shown first) of a judge request: the test's answers say which question."""
    qid = int(user.split("SYSTEM-ANSWER-", 1)[1].split()[0])
    return qid, user.index("SYSTEM-ANSWER") < user.index("[The Start of Assistant 2's Answer]")


@pytest.fixture
def judge_server():
    StandInForGPT4.log, StandInForGPT4.answered, StandInForGPT4.hang_at = [], [], None
    StandInForGPT4.release = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInForGPT4)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    StandInForGPT4.release.set()
    server.shutdown()
    server.server_close()


def _judge_inputs(tmp_path) -> tuple[Path, Path]:
    """Questions 1 (generic), 61 (coding), 68 (math), 71 (writing), and a system's answers to them."""
    source = REPO / "qlora_dist" / "evaluate" / "vicuna_bench" / "question.jsonl"
    keep = {1, 61, 68, 71}
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(l + "\n" for l in source.read_text().splitlines() if json.loads(l)["question_id"] in keep))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q, "answer_id": f"sys{q}", "model_id": "tiny",
                                           "choices": [{"index": 0, "turns": [f"SYSTEM-ANSWER-{q} here"]}]}) + "\n"
                               for q in sorted(keep)))
    return questions, answers


def test_judge_asks_both_orders_with_the_category_prompt_retries_and_caches(tmp_path, judge_server, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_BASE_URL", judge_server)
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    questions, answers = _judge_inputs(tmp_path)
    out = tmp_path / "reviews"
    args = ["eval", "judge", "--questions", str(questions), "--answers", str(answers), "--reference", str(REFERENCE),
            "--judge-model", "gpt-4", "--out", str(out), "--workers", "2", "--requests-per-minute", "0"]
    assert run_main(*args) == 0
    log = StandInForGPT4.log
    assert len(log) == 8 + 2  # 4 questions x 2 orders, plus the 429 and the 500 asked again
    assert sorted(StandInForGPT4.answered) == sorted((q, f) for q in (1, 61, 68, 71) for f in (False, True))
    prompts = {_request_key(b["messages"][1]["content"])[0]: b for b in log}
    assert "evaluate the coding abilities" in prompts[61]["messages"][1]["content"]
    assert "mathematical proficiency" in prompts[68]["messages"][1]["content"]
    assert "rate the helpfulness" in prompts[1]["messages"][1]["content"]
    assert all(b["temperature"] == 0.2 and b["max_tokens"] == 1024 and b["model"] == "gpt-4" for b in log)
    chatgpt_first = [json.loads(l) for l in (out / "chatgpt_first.jsonl").read_text().splitlines()]
    system_first = [json.loads(l) for l in (out / "system_first.jsonl").read_text().splitlines()]
    assert [r["answer2_id"] for r in chatgpt_first] == ["sys1", "sys61", "sys68", "sys71"]
    assert [r["answer1_id"] for r in system_first] == ["sys1", "sys61", "sys68", "sys71"]
    assert [r["reviewer_id"] for r in chatgpt_first] == [1, 2, 3, 1]
    assert [r["score"] for r in chatgpt_first] == [[8.0, 7.0], [8.0, 7.0], [-1, -1], [8.0, 7.0]]
    table = capsys.readouterr().out
    assert "87.5%" in table and "6 (2)" in table  # 7/8; 3 reviews per order kept, the math one unparsed
    assert (out / "relative_to_chatgpt.png").is_file()
    # the cache: the same command asks nothing again and writes the same reviews
    before = (out / "chatgpt_first.jsonl").read_text()
    assert run_main(*args) == 0 and len(StandInForGPT4.log) == 10
    assert (out / "chatgpt_first.jsonl").read_text() == before


@pytest.mark.slow
def test_a_killed_judge_run_resumes_without_asking_twice(tmp_path, judge_server):
    questions, answers = _judge_inputs(tmp_path)
    out = tmp_path / "reviews"
    args = ["eval", "judge", "--questions", str(questions), "--answers", str(answers), "--reference", str(REFERENCE),
            "--judge-model", "gpt-4", "--out", str(out), "--workers", "1", "--requests-per-minute", "0"]
    env = {**os.environ, "OPENAI_BASE_URL": judge_server, "OPENAI_API_KEY": "test", "PYTHONPATH": str(REPO)}
    StandInForGPT4.hang_at = 8  # requests 1 and 3 fail and are retried: the 6th review hangs
    proc = subprocess.Popen([sys.executable, "-m", "qlora_dist", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(StandInForGPT4.log) < 8 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert len(StandInForGPT4.log) == 8, "the client did not reach the hanging request"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    first_run = list(StandInForGPT4.answered)
    assert len(first_run) == 5 and not (out / "chatgpt_first.jsonl").exists()
    StandInForGPT4.hang_at = None
    StandInForGPT4.release.set()
    done = subprocess.run([sys.executable, "-m", "qlora_dist", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    second_run = StandInForGPT4.answered[len(first_run):]
    assert sorted(second_run) == sorted(set((q, f) for q in (1, 61, 68, 71) for f in (False, True)) - set(first_run))
    assert "5 from the cache" in done.stderr
