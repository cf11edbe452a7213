"""Chat data (issue 15, item 2): `messages` and ShareGPT files in their published shapes, rendered with the
Guanaco template (tiny tokenizer) and the tokenizer's own (SmolLM2's ChatML), labels checked token by token;
whole turns dropped when too long; bad conversations counted by reason; the tiny model learns from a chat file
through the real CLI."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, SHARED_DATA, TINY, read_metrics, run_cli
from qlora_dist.config import load_config
from qlora_dist.data.batches import IGNORE_INDEX, TEMPLATE_SPLITS, collate, tokenize_all, tokenize_chats
from qlora_dist.data.corpus import preview, read_examples, tokenize_examples
from qlora_dist.data.formats import Example
from qlora_dist.data.prompts import GUANACO_SYSTEM, Message
from qlora_dist.data.tasks import make_split

SYSTEM = "You are terse."
CHAT = [("system", SYSTEM), ("user", "Add 2 and 3."), ("assistant", "5"), ("user", "Now double it."),
        ("assistant", "10")]


def write_messages(path, conversations) -> None:
    """OpenAI-style JSON lines: {"messages": [{"role", "content"}, ...]}."""
    path.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in conv]}) + "\n"
                            for conv in conversations))


def write_sharegpt(path, conversations) -> None:
    """ShareGPT's JSON array: {"id", "conversations": [{"from": system|human|gpt, "value"}, ...]}."""
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    path.write_text(json.dumps([{"id": f"c{i}", "conversations": [{"from": names[r], "value": c} for r, c in conv]}
                                for i, conv in enumerate(conversations)], indent=1))


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir):
    from qlora_dist.model.base import load_tokenizer

    return {"guanaco": load_tokenizer(tiny_model_dir), "tokenizer": load_tokenizer("smollm2")}


def expected_row(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids and labels from the rendered text cut by hand into masked and trained pieces."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


GUANACO_PIECES = [(f"<s>{SYSTEM}\n### Human: Add 2 and 3. ### Assistant:", False), (" 5", True), ("</s>", True),
                  (" ### Human: Now double it. ### Assistant:", False), (" 10", True), ("</s>", True)]
CHATML_PIECES = [(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
                  "<|im_start|>assistant\n", False), ("5<|im_end|>", True),
                 ("\n<|im_start|>user\nNow double it.<|im_end|>\n<|im_start|>assistant\n", False),
                 ("10<|im_end|>", True), ("\n", False)]


def test_both_schemas_render_and_mask_token_by_token(tmp_path, tokenizers):
    write_messages(tmp_path / "chat.jsonl", [CHAT])
    write_sharegpt(tmp_path / "sharegpt.json", [CHAT])
    for name, fmt in (("chat.jsonl", "messages"), ("sharegpt.json", "sharegpt")):
        for template, pieces in (("guanaco", GUANACO_PIECES), ("tokenizer", CHATML_PIECES)):
            tok = tokenizers[template]
            cfg = load_config(overrides=[f"data.dataset={tmp_path / name}", f"data.chat_template={template}"])
            examples, report = read_examples(cfg)
            assert report.format == fmt and [(m.role, m.content) for m in examples[0].messages] == CHAT
            row = tokenize_all(examples, tok, cfg)[0]
            assert tok.decode(row.input_ids) == "".join(text for text, _ in pieces)
            ids, labels = expected_row(tok, pieces)
            assert row.input_ids == ids and row.labels == labels, (template, row.labels, labels)
    # SmolLM2: pad = EOS = <|im_end|>; each answer's <|im_end|> is trained all the same, also once padded.
    tok = tokenizers["tokenizer"]
    short = tokenize_all([Example("", "", (Message("user", "Hi"), Message("assistant", "Yo")))], tok, cfg)[0]
    labels = collate([row, short], tok.pad_token_id)["labels"]
    assert tok.pad_token_id == tok.eos_token_id and (labels == tok.eos_token_id).sum(dim=1).tolist() == [2, 1]
    # train_on_source: every label is the token itself; without a system message, guanaco has no system line
    # (the training rows' bare turn) and SmolLM2's template writes its own (masked like any prompt).
    cfg = load_config(overrides=[f"data.dataset={tmp_path / 'chat.jsonl'}", "data.train_on_source=true"])
    row = tokenize_all(read_examples(cfg)[0], tokenizers["guanaco"], cfg)[0]
    assert row.labels == row.input_ids
    bare = tuple(Message(r, c) for r, c in CHAT[1:])
    row = tokenize_all([Example("", "", bare)], tokenizers["guanaco"], cfg)[0]
    assert tokenizers["guanaco"].decode(row.input_ids).startswith("<s>### Human: Add 2 and 3.")
    row = tokenize_all([Example("", "", bare)], tok, load_config(overrides=["data.chat_template=tokenizer"]))[0]
    assert tok.decode(row.input_ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert tok.decode([t for t, k in zip(row.input_ids, row.labels) if k != IGNORE_INDEX]) == "5<|im_end|>10<|im_end|>"
    text = preview(load_config(overrides=[f"data.dataset={tmp_path / 'chat.jsonl'}", "data.chat_template=tokenizer"]),
                   tok, 1)
    assert "[[5<|im_end|>]]\\n<|im_start|>user\\nNow double it." in text


def test_too_long_conversations_lose_whole_turns_and_bad_ones_are_counted(tmp_path, tokenizers):
    long_answer = "1 2 3 4 5 6 7 8 9 " * 12
    convs = [CHAT,  # fits whole
             CHAT[:4] + [("assistant", long_answer)],  # keeps its first exchange only
             [("user", long_answer), ("assistant", "5")],  # not even one exchange fits: skipped, too_long
             [("user", "Hi"), ("critic", "Bad")], [("user", "Hi"), ("assistant", " ")],
             [("user", "Hi"), ("user", "Hi?"), ("assistant", "Yes")], [("assistant", "Hello"), ("user", "Hi")],
             [("user", "Hi"), ("system", "late"), ("assistant", "Yes")], [("user", "Hi")],
             CHAT + [("user", "Thanks!")]]  # a last question without an answer is dropped
    write_messages(tmp_path / "mixed.jsonl", convs)
    with (tmp_path / "mixed.jsonl").open("a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": ["parts"]}]}) + "\n")
        f.write(json.dumps({"messages": "hello"}) + "\n")
    for template, pieces in (("guanaco", GUANACO_PIECES), ("tokenizer", CHATML_PIECES)):
        tok = tokenizers[template]
        # Cut after the first exchange: its answer's end-of-turn token (and ChatML's line break after it).
        first_exchange = expected_row(tok, pieces[:3] if template == "guanaco" else [*pieces[:2], ("\n", False)])
        budget = len(expected_row(tok, pieces)[0])
        cfg = load_config(overrides=[f"data.dataset={tmp_path / 'mixed.jsonl'}", f"data.chat_template={template}",
                                     f"data.source_max_len={budget - 8}", "data.target_max_len=8"])
        examples, report = read_examples(cfg)
        rows = tokenize_examples(examples, tok, cfg, report)
        skipped = {k: v for k, v in report.skipped.items() if v}
        assert skipped == {"unknown_role": 1, "empty_output": 2, "turn_order": 3, "too_long": 1, "wrong_type": 2}
        assert report.records == 12 and report.examples == len(rows) == 3
        assert (rows[0].input_ids, rows[0].labels) == expected_row(tok, pieces)
        assert (rows[1].input_ids, rows[1].labels) == first_exchange, template
        assert rows[2].input_ids == rows[0].input_ids  # the unanswered last question is gone


def test_chat_template_tokenizer_needs_one_and_generate_follows_the_adapter(tmp_path, capsys):
    from qlora_dist import preflight
    from qlora_dist.cli import main

    write_messages(tmp_path / "chat.jsonl", [CHAT] * 8)
    cfg = load_config(overrides=[*TINY, f"data.dataset={tmp_path / 'chat.jsonl'}", "data.chat_template=tokenizer",
                                 f"train.output_dir={tmp_path / 'out'}"])
    problems = preflight.run(cfg, 1).problems
    assert problems == ["data.chat_template: 'tokenizer', but the tokenizer of model.path=tiny-llama has no chat "
                        "template; use data.chat_template=guanaco"]
    assert main(["generate", "--base", "tiny-llama", "--chat-template", "tokenizer", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "--chat-template: 'tokenizer', but the tokenizer of tiny-llama has no chat template" in err


def chat_conversations(n: int) -> list[list[tuple[str, str]]]:
    """Two built-in task questions per conversation, the first with a system message."""
    items, _ = make_split(["add", "uppercase"], n, 1, seed=3)
    return [([("system", GUANACO_SYSTEM)] if k % 2 == 0 else [])
            + [("user", a.prompt), ("assistant", a.answer), ("user", b.prompt), ("assistant", b.answer)]
            for k, (a, b) in enumerate(zip(items[0::2], items[1::2]))]


@pytest.mark.slow
def test_tiny_model_learns_from_a_chat_file(tmp_path):
    from qlora_dist.evaluate.generate import chat_template_of

    write_sharegpt(tmp_path / "chat.json", chat_conversations(32))
    out = tmp_path / "out"
    run_cli("train", *TINY, f"data.dataset={tmp_path / 'chat.json'}", "optim.lr=1e-2", "train.global_batch_size=4",
            "model.gradient_checkpointing=false", "train.max_steps=8", f"train.output_dir={out}", timeout=120)
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert chat_template_of(str(out / "adapter_model"), None, None, "tiny-llama") == "guanaco"  # generate's choice


@pytest.mark.skipif(not (SHARED_DATA / "oasst_guanaco").is_dir(), reason=(
    "needs the first 480 OASST1 conversations (~2 MB, too much to keep in tests/data) of "
    f"{SHARED_DATA / 'oasst_guanaco/oa_questions.jsonl'}"))
def test_fast_template_split_gives_the_exact_rows_on_real_conversations(tiny_model_dir, monkeypatch):
    """data.chat_template=tokenizer: one encoding of each whole conversation (batches._fast_bounds) gives the
    ids, labels and skips of tokenizing every turn prefix, on the first 480 OASST1 conversations (260, 209 and
    11 with 1, 2 and 3 user turns; every other with a system message), for SmolLM2's ChatML and, on the tiny tokenizer, a Llama-2 style
    template (BOS and EOS inside the text, no line break after them); no conversation needs the exact split.
    A template whose answer merges with the prompt's last word falls back to it and the row is skipped alike."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from chat_tokenize import conversations, load_template_tokenizer

    examples = [Example("", "", conv) for conv in conversations("oasst1", 480)]
    assert len(examples) == 480
    for model, skipped in (("smollm2", 23), ("tiny-llama", 163)):  # longer than 512 + 512 tokens
        tok = load_template_tokenizer(model)
        TEMPLATE_SPLITS.clear()
        fast = tokenize_chats(examples, tok, 512, 512, False, chat_template="tokenizer")
        assert TEMPLATE_SPLITS == {"fast": 480, "exact": 0}
        exact = tokenize_chats(examples, tok, 512, 512, False, chat_template="tokenizer", exact=True)
        assert [(r.input_ids, r.labels, r.skip) for r in fast] == [(r.input_ids, r.labels, r.skip) for r in exact]
        assert sum(r.skip == "too_long" for r in fast) == skipped, model
    # SmolLM2's template trims an answer's leading line break only once a later turn follows: that row
    # alone is skipped and counted, the others kept (it used to refuse the whole dataset).
    smol, ok = load_template_tokenizer("smollm2"), (Message("user", "Hi"), Message("assistant", "Yes"))
    trimmed = (*ok, Message("user", "Sure?"), Message("assistant", "\n\nYes."))
    for exact in (False, True):
        rows = tokenize_chats([Example("", "", trimmed), Example("", "", ok)], smol, 64, 64, False,
                              chat_template="tokenizer", exact=exact)
        assert [r.skip for r in rows] == ["template_mismatch", None] and rows[1].input_ids
    tok.chat_template = "{% for m in messages %}{{ m['content'] + ('\\nAnswer' if m['role'] == 'user' else '') }}{% endfor %}"
    merged = [Example("", "", (Message("user", "Hi"), Message("assistant", "s")))]  # 'Hi\nAnswer', 'Hi\nAnswers'
    for exact in (False, True):
        rows = tokenize_chats(merged, tok, 64, 64, False, chat_template="tokenizer", exact=exact)
        assert [r.skip for r in rows] == ["template_mismatch"]
