"""The seed's dataset formats: exact mapping of real rows (cuts in tests/data; Alpaca's in ../shared/data) and of files written in each
published schema, bad rows counted by reason, strict mode, the tokenized-data cache, packing, preview."""
from __future__ import annotations

import gzip
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SHARED_DATA, TEST_DATA, alpaca_file, needs_shared_alpaca, read_metrics, run_cli
from qlora_dist.config import load_config
from qlora_dist.data.batches import IGNORE_INDEX, BatchSchedule, collate, pack, padding_fraction, tokenize_all
from qlora_dist.data.corpus import cached_rows, fingerprint, read_examples, tokenize_examples
from qlora_dist.data.formats import ALPACA_PROMPT_NO_INPUT, Example
from qlora_dist.errors import ConfigError
from qlora_dist.dist import DistInfo



def examples_of(dataset, *overrides: str) -> tuple[list[Example], object]:
    return read_examples(load_config(overrides=[f"data.dataset={dataset}", *overrides]))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from qlora_dist.model.base import load_tokenizer

    return load_tokenizer(tiny_model_dir)


# ------------------------------------------------------------------------------ real rows, exact strings
ALPACA_INPUT_SOURCE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\nIdentify the odd one out.\n\n"
    "### Input:\nTwitter, Instagram, Telegram\n\n### Response: ")
ALPACA = SHARED_DATA / "alpaca/alpaca_tiny.json"


def _real(path: Path, fmt, n_records: int, n_examples: int, pair: tuple[str, str], marks=()):
    return pytest.param(path, fmt, n_records, n_examples, pair, marks=marks, id=f"{path.parent.name}/{path.name}")


REAL = [  # (file, format override, records, examples, an exact (source, target) among the examples)
    _real(ALPACA, None, 100, 100, (ALPACA_INPUT_SOURCE, "Telegram"), marks=needs_shared_alpaca),
    _real(ALPACA, None, 100, 100, (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nFind the capital of Spain.\n\n### Response: ", "The capital of Spain is Madrid."),
        marks=needs_shared_alpaca),
    _real(TEST_DATA / "hh-rlhf/harmless-base/test.jsonl.gz", None, 31, 31, ("", "\n\nHuman: Hey you!\n\nAssistant: Do you need help?")),
    _real(TEST_DATA / "self_instruct/seed_tasks.jsonl", None, 40, 40, ("Find the four smallest perfect numbers.\n\n", "6, 28, 496, and 8128")),
    _real(TEST_DATA / "self_instruct/user_oriented_instructions.jsonl", None, 31, 31, (
        "Answer the following question.\n\nHow do you say \"good evening\" in French.\n\n", "bonsoir")),
    _real(TEST_DATA / "longform/longform_train.json", None, 17, 17, (
        "\"Describe Brugnens.\" Respond in 11 words.",
        " Brugnens is a commune in the Gers department in southwestern France.")),
    _real(TEST_DATA / "oasst_guanaco/oa_questions.jsonl", None, 9, 9, ("### Human: ¿123 x 3567? ### Assistant:", "438,741")),
    _real(TEST_DATA / "flan_v2/qasc_train.tsv", "flan-cot", 40, 40, (
        "Mussels have what?\nOptions:\n- (A) seaweed\n- (B) arms\n- (C) Energy\n- (D) a shell\n- (E) warmth\n"
        "- (F) bacteria\n- (G) Length\n- (H) legs\nLet's think step by step.",
        "Most mollusks have shells. Mussels are bivalve mollusks. Mussels have shells. So the answer is (D).")),
]


@pytest.mark.parametrize("path,fmt,n_records,n_examples,pair", REAL)
def test_real_rows_map_to_the_exact_strings(path, fmt, n_records, n_examples, pair):
    examples, report = examples_of(path, *([f"data.format={fmt}"] if fmt else []))
    assert (report.records, report.examples, sum(report.skipped.values())) == (n_records, n_examples, 0)
    assert Example(*pair) in examples


@needs_shared_alpaca
def test_alpaca_rows_use_the_template_with_and_without_input():
    raw = json.loads(ALPACA.read_text())
    examples, report = examples_of(ALPACA)
    assert report.format == "alpaca"
    for row, ex in zip(raw, examples):
        assert ex.target == row["output"]
        assert ("### Input:\n" + row["input"] in ex.source) == (row["input"] != "")
    assert examples[0].source == ALPACA_PROMPT_NO_INPUT.format(instruction=raw[0]["instruction"])


# ------------------------------------------------------------------------- files in published schemas
def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SCHEMAS = [  # (file name, rows, format it is detected as, expected examples)
    ("chip2.jsonl", [{"text": "<human>: What is 2+2?\n<bot>: 4", "metadata": {"source": "unified_chip2"}}],
     "chip2", [("What is 2+2?", "4")]),
    ("guanaco.jsonl", [{"text": "### Human: Hi there### Assistant: Hello! How can I help?"}],
     "oasst1", [("", "### Human: Hi there### Assistant: Hello! How can I help?")]),
    ("self_instruct.jsonl", [{"prompt": "Make a list of 3 colors.\n\nOutput:", "completion": " red, green, blue"}],
     "self-instruct", [("Make a list of 3 colors.\n\nOutput:", " red, green, blue")]),
    ("unnatural.jsonl", [{"instruction": "Add the numbers.", "instances": [
        {"instruction_with_input": "Add the numbers. 2, 3", "input": "2, 3", "output": "5", "constraints": "None."},
        {"instruction_with_input": "Add the numbers. 1, 1", "input": "1, 1", "output": "2", "constraints": "None."}],
        "reformulations": []}],
     "unnatural-instructions", [("Add the numbers. 2, 3", "5"), ("Add the numbers. 1, 1", "2")]),
    ("flan.jsonl", [{"inputs": "Translate to German: cat", "targets": "Katze", "task": "wmt16_translate"}],
     "flan-v2", [("Translate to German: cat", "Katze")]),
    ("hh.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}],
     "hh-rlhf", [("", "\n\nHuman: hi\n\nAssistant: hello")]),
    ("generic.jsonl", [{"input": "Q: 1+1?", "output": "2", "id": 7}], "input-output", [("Q: 1+1?", "2")]),
]


@pytest.mark.parametrize("name,rows,fmt,expected", SCHEMAS, ids=[s[2] for s in SCHEMAS])
def test_published_schemas_map_exactly(tmp_path, name, rows, fmt, expected):
    examples, report = examples_of(write_jsonl(tmp_path / name, rows))
    assert report.format == fmt
    assert examples == [Example(*e) for e in expected]
    # The same with the format named explicitly, as data.format=... does for ambiguous files.
    assert examples_of(tmp_path / name, f"data.format={fmt}")[0] == examples


def test_tables_folders_and_saved_datasets_load_through_datasets(tmp_path):
    import datasets

    rows = [{"input": f"question {i}", "output": f"answer {i}"} for i in range(5)]
    expected = [Example(r["input"], r["output"]) for r in rows]
    table = datasets.Dataset.from_list(rows)
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "a.jsonl", rows[:2])
    write_jsonl(tmp_path / "folder" / "b.jsonl", rows[2:])
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    for source in ("d.csv", "d.parquet", "saved", "folder", "d.jsonl.gz"):
        assert examples_of(tmp_path / source)[0] == expected, source


def test_unclear_or_missing_sources_are_named(tmp_path):
    write_jsonl(tmp_path / "plain.jsonl", [{"text": "just some text"}])
    with pytest.raises(ConfigError, match="data.format: cannot tell the format.*'text'"):
        examples_of(tmp_path / "plain.jsonl")
    from qlora_dist import preflight

    def problems(*overrides):  # files are looked at by the preflight, not by the config schema
        return "\n".join(preflight.run(load_config(overrides=list(overrides)), 1).problems)
    assert "neither a file, a folder nor a known dataset" in problems(f"data.dataset={tmp_path / 'nope.json'}")
    with pytest.raises(ConfigError, match="data.format: unknown 'alpacca'"):
        load_config(overrides=["data.dataset=alpaca", "data.format=alpacca"])
    (tmp_path / "d.txt").write_text("x")
    assert "unsupported file type '.txt'" in problems(f"data.dataset={tmp_path / 'd.txt'}")


def test_a_named_dataset_missing_from_the_offline_cache_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match="'alpaca' \\(tatsu-lab/alpaca\\) is neither in the HF datasets cache"):
        examples_of("alpaca")


def test_a_named_dataset_loads_from_a_downloaded_hub_repository(tmp_path, monkeypatch):
    """The layout `huggingface-cli download --repo-type dataset tatsu-lab/alpaca` leaves in the hub cache,
    holding 100 rows in Alpaca's schema."""
    import datasets

    repo = tmp_path / "hub" / "datasets--tatsu-lab--alpaca"
    (repo / "snapshots" / "0123abc" / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    local = alpaca_file(tmp_path / "alpaca.jsonl", 100)
    rows = [json.loads(line) for line in local.read_text().splitlines()]
    datasets.Dataset.from_list(rows).to_parquet(str(repo / "snapshots/0123abc/data/train-00000-of-00001.parquet"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    examples, report = examples_of("alpaca")
    assert report.format == "alpaca" and report.records == 100
    assert examples == examples_of(local)[0]


# ------------------------------------------------------------------------------------------ bad rows
def corrupted_file(path: Path) -> tuple[Path, int]:
    """1,000 rows; every 20th (lines 20, 40, ..., 1000: 50 rows, 5%) is bad in one of five ways, in turn.
    Returns the path and the first bad line."""
    kinds = ["missing", "type", "empty", "utf8", "long"]
    lines, bad = [], 0
    for i in range(1000):
        row = {"instruction": f"Repeat {i}.", "input": "", "output": f"{i}"}
        if i % 20 == 19:
            kind, bad = kinds[bad % 5], bad + 1
            if kind == "missing":
                del row["output"]
            elif kind == "type":
                row["instruction"] = ["not", "a", "string"]
            elif kind == "empty":
                row["output"] = "  "
            elif kind == "long":
                row["input"] = "x" * 5000
            if kind == "utf8":
                lines.append(json.dumps(row).encode().replace(b"Repeat", b"R\xff\xfepeat"))
                continue
        lines.append(json.dumps(row).encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, 20


def test_bad_rows_are_skipped_and_counted_per_reason(tmp_path):
    path, _ = corrupted_file(tmp_path / "alpaca_bad.jsonl")
    examples, report = examples_of(path, "data.max_row_chars=4000")
    print(report.summary())
    assert report.records == 1000 and report.examples == 950 == len(examples)
    assert report.skipped == {"bad_json": 0, "non_utf8": 10, "missing_field": 10, "wrong_type": 10,
                              "empty_output": 10, "too_long": 10, "unknown_role": 0, "turn_order": 0,
                              "template_mismatch": 0}
    assert report.first_skip.startswith(f"{path}:20: missing_field in field 'output'")


def test_strict_mode_stops_at_the_first_bad_line_naming_file_line_and_field(tmp_path):
    path, first_bad = corrupted_file(tmp_path / "alpaca_bad.jsonl")
    with pytest.raises(ConfigError) as err:
        examples_of(path, "data.strict=true")
    assert f"{path}:{first_bad}: missing_field in field 'output'" in str(err.value)
    # And from the command line: exit code 2, the same message, nothing trained or written.
    out = tmp_path / "run"
    proc = run_cli("train", "model.path=tiny-llama", f"data.dataset={path}", "data.strict=true",
                   f"train.output_dir={out}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"alpaca_bad.jsonl:{first_bad}: missing_field in field 'output'" in proc.stderr
    assert not list(out.glob("checkpoint-*"))


# ------------------------------------------------------------------------------ tokenization, masking
def test_labels_mask_the_source_token_by_token_on_a_real_format(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Name a fruit.", "input": "", "output": "An apple."}])
    for on_source in (False, True):
        cfg = load_config(overrides=[f"data.dataset={path}", f"data.train_on_source={str(on_source).lower()}"])
        examples, _ = read_examples(cfg)
        row = tokenize_all(examples, tokenizer, cfg)[0]
        source = tokenizer(tokenizer.bos_token + examples[0].source, add_special_tokens=False)["input_ids"]
        target = tokenizer("An apple." + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        assert row.input_ids == source + target
        for position, (token, label) in enumerate(zip(row.input_ids, row.labels)):
            trained = on_source or position >= len(source)
            assert label == (token if trained else IGNORE_INDEX), position


def test_packing_keeps_each_examples_tokens_and_labels(tokenizer):
    examples = [Example(f"question {i} " * (i + 1), f" answer {i}") for i in range(12)]
    rows = [r for r in tokenize_all(examples, tokenizer, load_config(overrides=["data.train_on_source=true"]))]
    packed = pack(rows, 64, seed=3)
    assert len(packed) < len(rows) and all(len(p.input_ids) <= 64 for p in packed)
    pieces = []
    for p in packed:  # split each packed row where its position ids restart
        starts = [i for i, pos in enumerate(p.position_ids) if pos == 0] + [len(p.input_ids)]
        pieces += [(p.input_ids[a:b], p.labels[a:b]) for a, b in zip(starts, starts[1:])]
    originals = sorted((r.input_ids, [IGNORE_INDEX] + r.labels[1:]) for r in rows)
    assert sorted(pieces) == originals


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_give_the_logits_they_give_alone(tmp_path, tiny_model_dir, tokenizer, attention):
    from qlora_dist.model.base import load_base

    model = load_base(tiny_model_dir, bits=16, compute_dtype="float32", attn_implementation=attention).eval()
    examples = [Example("The sky is", " blue"), Example("One two three", " four five"),
                Example("### Human: hi ### Assistant:", " hello there, friend")]
    rows = tokenize_all(examples, tokenizer, load_config())
    packed = pack(rows, sum(len(r.input_ids) for r in rows), seed=0)
    assert len(packed) == 1
    batch = collate(packed, tokenizer.pad_token_id)
    assert "attention_mask" not in batch
    with torch.no_grad():
        # use_cache=False as in training: transformers looks for packed sequences only without a KV cache.
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        # Control: the same row as one causal sequence (attention across examples) must differ.
        crossing = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        starts = [i for i, p in enumerate(packed[0].position_ids) if p == 0] + [len(packed[0].input_ids)]
        worst, worst_crossing = 0.0, 0.0
        for a, b in zip(starts, starts[1:]):
            alone = model(input_ids=batch["input_ids"][:, a:b]).logits[0]
            worst = max(worst, float((together[a:b] - alone).abs().max()))
            worst_crossing = max(worst_crossing, float((crossing[a:b] - alone).abs().max()))
    scale = float(together.abs().max())
    print(f"{attention}: packed vs alone: max |diff| {worst:.2e} (logit scale {scale:.2f}); without position ids "
          f"{worst_crossing:.2e}")
    assert worst <= 1e-5 * max(scale, 1.0)  # fp32: summation order only
    assert worst_crossing > 1e-3


@needs_shared_alpaca
def test_padding_fraction_on_alpaca_at_the_7b_preset_lengths():
    """Reported in the closing note: the SmolLM2 tokenizer (the LLaMA tokenizer is not on this machine)."""
    from qlora_dist.model.base import load_tokenizer
    from qlora_dist.model.builtin import resolve_model_path

    tok = load_tokenizer(resolve_model_path("smollm2"))
    base = ["model.path=smollm2", f"data.dataset={ALPACA}"]
    cfg = load_config(preset="7b-all", overrides=base)
    micro = 16  # the paper's 7B batch as one micro-batch: padding only matters above micro batch 1
    examples, _ = read_examples(cfg)
    plain = tokenize_examples(examples, tok, cfg)
    packed = tokenize_examples(examples, tok, load_config(preset="7b-all", overrides=[*base, "data.packing=true"]))

    def fraction(rows, lengths=None):
        schedule = BatchSchedule(len(rows), micro, micro, 0, 1, seed=0, lengths=lengths)
        steps = len(rows) // micro
        return padding_fraction([[rows[i] for i in schedule.global_indices(s)] for s in range(steps)])

    f_plain, f_grouped, f_packed = fraction(plain), fraction(plain, [len(r.input_ids) for r in plain]), fraction(packed)
    print(f"alpaca_tiny at source/target {cfg.data.source_max_len}/{cfg.data.target_max_len}, micro batch {micro}: "
          f"padding {100 * f_plain:.1f}% plain, {100 * f_grouped:.1f}% group_by_length, {100 * f_packed:.1f}% "
          f"packed ({len(plain)} rows -> {len(packed)} packed rows)")
    assert f_packed < f_plain / 4 and f_grouped < f_plain


def test_group_by_length_batches_similar_lengths_and_still_uses_every_example():
    lengths = [(i * 37) % 101 + 1 for i in range(320)]
    grouped = BatchSchedule(320, 16, 4, 0, 1, seed=1, lengths=lengths)
    plain = BatchSchedule(320, 16, 4, 0, 1, seed=1)
    epoch = [i for s in range(20) for i in grouped.global_indices(s)]
    assert sorted(epoch) == list(range(320))

    def spread(schedule):
        return sum(max(lengths[i] for i in mb) - min(lengths[i] for i in mb)
                   for s in range(20) for mb in schedule.micro_batches(s))
    assert spread(grouped) < spread(plain) / 4


# ----------------------------------------------------------------------------------------------- cache
def test_the_cache_is_built_once_and_keyed_by_data_tokenizer_and_settings(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": f"q{i}", "output": f"a{i}"} for i in range(20)])
    over = [f"data.dataset={path}", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config(overrides=over)
    info = DistInfo(0, 0, 1)
    rows, report = cached_rows(cfg, tokenizer, info, tmp_path / "cache")
    stamp = (Path(report["cache"]) / "report.json").stat().st_mtime_ns
    again, report2 = cached_rows(cfg, tokenizer, info, tmp_path / "cache")
    assert report2["cache"] == report["cache"] and (Path(report["cache"]) / "report.json").stat().st_mtime_ns == stamp
    assert [again[i] for i in range(len(again))] == tokenize_examples(read_examples(cfg)[0], tokenizer, cfg)
    others = [load_config(overrides=[*over, "data.source_max_len=7"]), load_config(overrides=[*over, "data.packing=true"])]
    prints = {fingerprint(c, tokenizer) for c in [cfg, *others]}
    write_jsonl(path, [{"input": f"q{i}", "output": f"b{i}"} for i in range(20)])  # the data changed
    prints.add(fingerprint(cfg, tokenizer))
    assert len(prints) == 4
    assert not list((tmp_path / "cache").glob(".tmp-*"))


# ----------------------------------------------------------------------------------- preview, training
def test_preview_prints_mapped_rows_token_counts_and_skips(tmp_path):
    path, _ = corrupted_file(tmp_path / "alpaca_bad.jsonl")
    out = run_cli("data", "preview", str(path), "model.path=tiny-llama", "data.max_row_chars=4000", "--n", "2").stdout
    assert out.count("--- example") == 2 and "[source] 'Below is an instruction" in out and "[target] '0'" in out
    assert "masked labels" in out and "warning:" not in out  # 1% per cause: counted, not warned
    assert "1,000 records -> 950 examples; skipped: non_utf8 10, missing_field 10, wrong_type 10, empty_output 10, " \
           "too_long 10" in out


@pytest.mark.slow
def test_a_few_steps_on_each_real_sample_give_finite_losses(tmp_path):
    """The cuts of tests/data, and the real Alpaca rows where ../shared/data has them."""
    import subprocess

    samples = [f"{name}:data.dataset={TEST_DATA / p}" for name, p in [
        ("hh-rlhf", "hh-rlhf/harmless-base/test.jsonl.gz"),
        ("self-instruct-seed", "self_instruct/seed_tasks.jsonl"),
        ("self-instruct-user", "self_instruct/user_oriented_instructions.jsonl"),
        ("longform", "longform/longform_train.json"), ("oasst-questions", "oasst_guanaco/oa_questions.jsonl")]]
    samples.append(f"flan-cot:data.dataset={TEST_DATA / 'flan_v2/qasc_train.tsv'},data.format=flan-cot")
    if ALPACA.is_file():
        samples.append(f"alpaca:data.dataset={ALPACA}")
    settings = ["model.path=tiny-llama", "lora.r=8", "train.global_batch_size=4", "train.micro_batch_size=2",
                "train.max_steps=3", "train.save_steps=3", "eval.at_end=false", "data.source_max_len=96",
                "data.target_max_len=96", "data.max_examples=48", "data.packing=true"]
    proc = subprocess.run([sys.executable, str(REPO / "tests/workers/train_cases.py"), str(tmp_path), *samples,
                           "--", *settings], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r]
              for name in (s.partition(":")[0] for s in samples)}
    print({k: [round(x, 3) for x in v] for k, v in losses.items()})
    assert len(losses) == len(samples) >= 6
    for name, curve in losses.items():
        assert len(curve) == 3 and all(math.isfinite(x) and x > 0 for x in curve), name
        assert (tmp_path / name / "adapter_model" / "adapter_model.safetensors").is_file(), name


@pytest.mark.slow
def test_two_ranks_share_one_cache_built_by_rank_zero(tmp_path):
    from conftest import run_torchrun

    path, _ = corrupted_file(tmp_path / "alpaca_bad.jsonl")
    out = tmp_path / "run"
    run_torchrun(2, "train", "model.path=tiny-llama", "lora.r=8", f"data.dataset={path}", "data.max_row_chars=4000",
                 "data.group_by_length=true", "train.global_batch_size=8", "train.micro_batch_size=2",
                 "train.max_steps=3", "train.save_steps=3", "eval.at_end=false", f"train.output_dir={out}")
    caches = [p for p in (out / "data-cache").iterdir() if p.name != ".locks"]
    assert len(caches) == 1 and caches[0].is_dir(), caches  # one build, nothing half-written left
    report = json.loads((caches[0] / "report.json").read_text())
    assert report["built_by"]["rank"] == 0 and report["examples"] == report["rows"] == 950
    event = next(r for r in read_metrics(out) if r.get("event") == "data")
    assert event["skipped"]["non_utf8"] == 10 and event["cache"] == str(caches[0])
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3]


# ------------------------------------------------------------------------ readers: cells, BOMs, long lines
def test_csv_empty_cells_are_empty_strings_and_every_row_trains(tmp_path):
    """D14 of the 2026-12-07 red team: Alpaca saved as CSV trained on 46 of 100 rows (empty `input` cells
    read as missing). Cells of "", "None" and "NA" are texts; a quoted cell spanning lines is one record in
    the preflight's count too."""
    import csv

    rows = [{"instruction": f"Say {i}.", "input": "" if i % 2 else f"context {i}", "output": f"line one\nline {i}"}
            for i in range(20)]
    rows[3]["output"], rows[5]["output"] = "None", "NA"
    with open(tmp_path / "plain.csv", "w", newline="", encoding="utf-8-sig") as fh:  # and a BOM (D12)
        writer = csv.DictWriter(fh, ["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)
    examples, report = examples_of(tmp_path / "plain.csv")
    assert report.records == report.examples == 20 and report.warnings() == []
    assert examples[1].source == ALPACA_PROMPT_NO_INPUT.format(instruction="Say 1.")
    assert [examples[3].target, examples[5].target] == ["None", "NA"]
    from qlora_dist.data import records

    head, count = records.look(records.resolve(str(tmp_path / "plain.csv"), None), 200_000)
    assert count == 20 and set(head[0].data) == {"instruction", "input", "output"} and head[1].data["input"] == ""


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path):
    """D8/D9: a JSON-lines file with a UTF-8 BOM lost its first row as bad_json; a JSON array with one was
    read as JSON lines. Both keep all rows now, gzipped too."""
    rows = [{"input": f"q{i}", "output": f"a{i}"} for i in range(5)]
    expected = [Example(r["input"], r["output"]) for r in rows]
    (tmp_path / "bom.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8-sig")
    (tmp_path / "bom.json").write_text(json.dumps(rows, indent=1), encoding="utf-8-sig")
    with gzip.open(tmp_path / "bom.jsonl.gz", "wt", encoding="utf-8-sig") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("bom.jsonl", "bom.json", "bom.jsonl.gz"):
        examples, report = examples_of(tmp_path / name)
        assert examples == expected and report.skipped["bad_json"] == 0, name


def test_a_cause_skipping_over_five_percent_of_rows_is_a_warning(tmp_path, tokenizer):
    """Skips of one reason and field above corpus.SKIP_WARN_SHARE (5%) are a warning naming both and the
    first row, kept in the cache's report (the trainer logs it on rank 0); 5% or fewer are only counted."""
    from qlora_dist.data.corpus import SKIP_WARN_SHARE

    def alpaca(n_missing: int) -> Path:
        rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(100)]
        for row in rows[10:10 + n_missing]:
            del row["output"]
        return write_jsonl(tmp_path / f"missing{n_missing}.jsonl", rows)
    assert SKIP_WARN_SHARE == 0.05
    assert examples_of(alpaca(5))[1].warnings() == []
    path = alpaca(6)
    warning = f"6 of 100 rows (6%) skipped as missing_field in 'output' (first: {path}:11)"
    assert examples_of(path)[1].warnings() == [warning]
    cfg = load_config(overrides=[f"data.dataset={path}", f"data.cache_dir={tmp_path / 'cache'}"])
    _, report = cached_rows(cfg, tokenizer, DistInfo(0, 0, 1), tmp_path / "cache")
    assert report["warnings"] == [warning]


def write_long_line(path: Path, mib: int) -> Path:
    """A row of `mib` MiB, then a good row and a bad one; written in pieces (the writer never holds the row)."""
    with (gzip.open if path.name.endswith(".gz") else open)(path, "wb") as fh:
        fh.write(b'{"instruction": "')
        for _ in range(mib):
            fh.write(b"a" * 2**20)
        fh.write(b'", "output": "x"}\n{"instruction": "after", "output": "y"}\n{not json}\n')
    return path


def read_back(path: Path) -> tuple[int, list]:
    """(the preflight's count, (line, record or skip reason) of each record read)."""
    from qlora_dist.data import records

    source = records.resolve(str(path), None)
    return records.look(source, 200_000)[1], [(r.where.rsplit(":", 1)[1], getattr(r.data, "reason", r.data))
                                             for r in records.read(source, 200_000)]


READ_BACK = (3, [("1", "too_long"), ("2", {"instruction": "after", "output": "y"}), ("3", "bad_json")])


@pytest.mark.parametrize("name", ["long.jsonl", "long.jsonl.gz"])
def test_an_over_long_line_is_skipped_without_being_held(tmp_path, name):
    """D7: a one-line 2 GB JSONL peaked at 3.3x the line before being skipped as too_long. A 40 MiB line
    is now skipped in chunks: the preflight's look and the read together allocate at most a few MiB at once
    (tracemalloc's peak: every bytes, str and dict they make; ~120 MiB before), and the lines after it
    keep their numbers."""
    import tracemalloc

    path = write_long_line(tmp_path / name, 40)
    tracemalloc.start()
    try:
        assert read_back(path) == READ_BACK
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2**20, f"{peak / 2**20:.1f} MiB"


def test_a_json_array_too_large_for_memory_is_refused_naming_the_way_out(tmp_path, monkeypatch):
    """A JSON array is parsed whole: one needing more than the memory available (here made so by the
    factor) is one line suggesting JSON lines, not an OOM kill."""
    from qlora_dist.data import records

    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"input": "q", "output": "a"}] * 10))
    monkeypatch.setattr(records, "JSON_ARRAY_MEMORY_FACTOR", records._available_memory() // path.stat().st_size + 1)
    with pytest.raises(ConfigError) as err:
        examples_of(path)
    assert len(err.value.problems) == 1 and str(path) in str(err.value) and "convert it to JSON lines" in str(err.value)
