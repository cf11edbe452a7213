"""`eval vicuna`: SmolLM2 (4-bit) answers 4 of the benchmark's questions with the paper's sampling, in fixed
batches seeded each from (--seed, its first question): a killed run continues and regenerates only what
is missing, a complete file makes a rerun generate nothing, and 2 ranks give the 1-rank answers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_cli, run_torchrun

QUESTIONS = REPO / "qlora_dist" / "evaluate" / "vicuna_bench" / "question.jsonl"
# One thread per process, as torchrun gives each rank: the 1-rank run computes with the same kernels.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _args(questions: Path, out: Path) -> list[str]:
    return ["eval", "vicuna", "--base", "smollm2", "--questions", str(questions), "--out", str(out),
            "--max-new-tokens", "5", "--batch-size", "2", "--seed", "3", "--model-id", "smol"]


def _texts(path: Path) -> dict[int, str]:
    return {r["question_id"]: r["text"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
def test_answers_do_not_depend_on_the_ranks_and_resume_after_a_kill(tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(QUESTIONS.read_text().splitlines(keepends=True)[:4]))
    two = tmp_path / "two_ranks.jsonl"
    run_torchrun(2, *_args(questions, two), timeout=300)  # batch (1, 2) on rank 0, (3, 4) on rank 1
    rows = [json.loads(line) for line in two.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [1, 2, 3, 4]
    assert all(set(r) == {"question_id", "text", "answer_id", "model_id", "metadata"} and r["model_id"] == "smol"
               and len(r["answer_id"]) == 22 for r in rows)
    assert any(r["text"] for r in rows)  # sampled at temperature 0.7 (the default): some words came out

    # One rank continues a run killed while writing question 2's line: question 1's line stays as it was,
    # both batches are generated here (the first whole, from its seed) and match the 2-rank answers.
    lines = two.read_text().splitlines(keepends=True)
    killed = tmp_path / "killed.jsonl"
    killed.write_text(lines[0] + lines[1][: len(lines[1]) // 2])
    resumed = run_cli(*_args(questions, killed), env=ONE_THREAD, timeout=300)
    assert "1 of 4 answers already in" in resumed.stderr and "3 answers generated" in resumed.stderr
    assert _texts(killed) == _texts(two)
    assert killed.read_text().splitlines()[0] == lines[0].rstrip("\n")

    again = run_cli(*_args(questions, killed), env=ONE_THREAD, timeout=300)
    assert "all 4 answers are already in" in again.stderr and "base model" not in again.stderr
