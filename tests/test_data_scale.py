"""Mixtures (data.dataset as a list, with weights) and the streamed, compact tokenized-data cache (issue 15,
items 4 and 5): the streamed cache equals the in-memory build row by row, a mixture of real sample files
gives the expected per-dataset counts, and a bad list entry is named by its index."""
from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from conftest import TEST_DATA, alpaca_file
from qlora_dist.config import load_config
from qlora_dist.data import corpus
from qlora_dist.data.batches import TokenizedExample
from qlora_dist.data.corpus import TokenizedRows, cached_rows, read_examples, tokenize_examples
from qlora_dist.errors import ConfigError
from qlora_dist.dist import DistInfo

ONE_RANK = DistInfo(0, 0, 1)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from qlora_dist.model.base import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def reference_sha256(rows: list[TokenizedExample]) -> str:
    """The content hash of a version 1 cache (int64 columns, datasets' 1,000-row record batches)."""
    h = hashlib.sha256()
    for k in range(0, len(rows), 1000):
        for column in ("input_ids", "labels"):
            values = [getattr(r, column) for r in rows[k:k + 1000]]
            h.update(np.array([len(v) for v in values], dtype=np.int64).tobytes())
            h.update(np.array([t for v in values for t in v], dtype=np.int64).tobytes())
    return h.hexdigest()


def test_the_streamed_cache_equals_the_in_memory_build_row_by_row(tmp_path, tokenizer, monkeypatch):
    """Small batches, tokenized in forked workers after the first one, plain and packed: every row (tokens,
    labels, position ids), the skip counts and the content hash equal the in-memory build's."""
    monkeypatch.setattr(corpus, "WRITE_BATCH", 64)
    monkeypatch.setattr(corpus._Tokenizers, "SERIAL_BATCHES", 1)
    path = alpaca_file(tmp_path / "a.jsonl", 1100, bad_every=50)
    for packing in ("false", "true"):
        cfg = load_config(overrides=[f"data.dataset={path}", f"data.packing={packing}", "data.pack_length=300",
                                     "data.source_max_len=48", "data.target_max_len=24", "train.seed=3"])
        rows, report = cached_rows(cfg, tokenizer, ONE_RANK, tmp_path / "cache")
        examples, expected_report = read_examples(cfg)
        expected = tokenize_examples(examples, tokenizer, cfg)
        assert len(rows) == len(expected) and [rows[i] for i in range(len(rows))] == expected, packing
        assert rows.lengths() == [len(r.input_ids) for r in expected]
        assert report["skipped"] == expected_report.skipped and report["skipped"]["missing_field"] == 22
        assert (report["records"], report["examples"]) == (1100, 1078)
        assert rows.content_sha256() == reference_sha256(expected)
    assert rows[0].position_ids is not None and len(rows) < 1078 / 2  # the packed one


def test_compact_columns_keep_wide_token_ids_and_several_masked_spans():
    """int32 where ids pass 65,535; the trained mask keeps multi-turn label spans exactly."""
    plain = [TokenizedExample([1, 70_000, 5, 6, 7, 2], [-100, 70_000, -100, -100, 7, 2])]
    packed = [TokenizedExample([1, 9, 9, 4], [1, 9, -100, 4], [0, 0, 1, 2])]
    stored = TokenizedRows.from_rows(plain)
    assert stored[0] == plain[0] and stored.table.features["input_ids"].feature.dtype == "int32"
    assert TokenizedRows.from_rows(packed)[0] == packed[0]


def test_a_weighted_mixture_of_real_samples_counts_each_dataset(tmp_path, tokenizer):
    """Generated Alpaca-schema rows, the real self-instruct seed tasks (a 40-row cut, tests/data) and a file
    with bad rows."""
    alpaca, seed = alpaca_file(tmp_path / "alpaca.jsonl", 100), TEST_DATA / "self_instruct/seed_tasks.jsonl"
    bad = alpaca_file(tmp_path / "bad.jsonl", 40, bad_every=10)
    mixture = f"data.dataset=[{{path: {alpaca}, weight: 0.25}}, {{path: {seed}, weight: 1.6}}, {bad}]"
    over = [mixture, "data.source_max_len=64", "data.target_max_len=32", "train.seed=5"]
    cfg = load_config(overrides=over)
    rows, report = cached_rows(cfg, tokenizer, ONE_RANK, tmp_path / "cache")
    parts = report["parts"]
    assert [(p["key"], p["format"], p["records"], p["examples"], p["weight"], p["taken"]) for p in parts] == [
        ("data.dataset[0]", "alpaca", 100, 100, 0.25, 25),
        ("data.dataset[1]", "self-instruct-instances", 40, 40, 1.6, 64),
        ("data.dataset[2]", "alpaca", 40, 36, 1.0, 36)]
    assert [sum(p["skipped"].values()) for p in parts] == [0, 0, 4] and report["skipped"]["missing_field"] == 4
    assert len(rows) == report["rows"] == report["examples"] == 25 + 64 + 36
    # Each dataset's rows, in order: alpaca a sample of 25 distinct rows, seed tasks each once and 24 twice.
    examples, _ = read_examples(cfg)
    plain = [tuple(r.input_ids) for r in tokenize_examples(examples, tokenizer, cfg)]
    got = [tuple(rows[i].input_ids) for i in range(len(rows))]
    assert set(got[:25]) <= set(plain[:100]) and len(set(got[:25])) == 25
    assert sorted(Counter(Counter(got[25:89]).values()).items()) == [(1, 16), (2, 24)]
    assert set(got[25:89]) == set(plain[100:140]) and got[89:] == plain[140:]
    summary = report["summary"].splitlines()
    assert summary[0].startswith(f"data.dataset[0] {alpaca} (format alpaca): 100 records -> 100 examples, weight "
                                 "0.25 -> 25; skipped: none")
    assert "data.dataset[2]" in summary[2] and "missing_field 4" in summary[2]
    assert summary[3].startswith("data: mixture of 3 datasets: 180 records -> 125 examples")
    # Every dataset and weight is in the cache's key; the preview shows each dataset.
    other = load_config(overrides=[*over[1:], mixture.replace("1.6", "1.5")])
    assert corpus.fingerprint(other, tokenizer) != corpus.fingerprint(cfg, tokenizer)
    shown = corpus.preview(cfg, tokenizer, 1)
    assert all(f"--- data.dataset[{i}] example 1:" in shown for i in range(3)) and "125 training rows" in shown


def test_a_bad_list_entry_is_named_by_its_index(tmp_path):
    from qlora_dist import preflight

    good = alpaca_file(tmp_path / "good.jsonl", 20)
    with pytest.raises(ConfigError, match=r"data.dataset\[1\]: weight: must be a number > 0 \(got 0\)"):
        load_config(overrides=[f"data.dataset=[{good}, {{path: {good}, weight: 0}}]"])
    with pytest.raises(ConfigError, match=r"data.dataset\[0\]: expected a dataset name or path"):
        load_config(overrides=[f"data.dataset=[{{file: {good}}}]"])
    (tmp_path / "plain.jsonl").write_text('{"text": "no markers"}\n')
    problems = "\n".join(preflight.run(load_config(overrides=[
        f"data.dataset=[{good}, {tmp_path / 'missing.jsonl'}]"]), 1).problems)
    assert f"data.dataset[1]: '{tmp_path / 'missing.jsonl'}' is neither a file" in problems
    with pytest.raises(ConfigError, match=rf"data.dataset\[1\]: format: cannot tell the format of {tmp_path / 'plain.jsonl'}"):
        read_examples(load_config(overrides=[f"data.dataset=[{good}, {tmp_path / 'plain.jsonl'}]"]))
