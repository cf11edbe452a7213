from collections import Counter

import pytest

from qlora_dist.config import load_config
from qlora_dist.data.batches import IGNORE_INDEX, BatchSchedule, Example, collate, tokenize
from qlora_dist.data.tasks import TASKS, exact_match, majority_baseline, make_split


def test_tasks_are_deterministic_and_answers_correct():
    a = make_split(list(TASKS), 50, 20, seed=1)
    assert a == make_split(list(TASKS), 50, 20, seed=1)
    assert a != make_split(list(TASKS), 50, 20, seed=2)
    train, held_out = a
    assert len(train) == 150 and len(held_out) == 60
    for item in train + held_out:
        if item.task == "add":
            x, y = (int(t) for t in item.prompt.split("What is ")[1].split("?")[0].split(" + "))
            assert item.answer == str(x + y)
        elif item.task == "sort_digits":
            shown = item.prompt.split(": ")[1].split(".")[0].split()
            assert item.answer.split() == sorted(shown)
        else:
            assert item.answer == item.prompt.split("'")[1].upper()


def test_held_out_items_never_appear_in_training():
    train, held_out = make_split(list(TASKS), 1200, 60, seed=0)
    train_prompts = {i.prompt for i in train}
    assert not train_prompts & {i.prompt for i in held_out}
    train_words = {i.answer for i in train if i.task == "uppercase"}
    assert not train_words & {i.answer for i in held_out if i.task == "uppercase"}  # unseen words


def test_exact_match_and_majority_baseline():
    assert exact_match(" 42 ", "42") and not exact_match("42.", "42")
    _, held_out = make_split(["add"], 10, 60, seed=0)
    counts = Counter(i.answer for i in held_out)
    assert majority_baseline(held_out) == max(counts.values()) / 60


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from qlora_dist.model.base import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def test_labels_mask_the_source_token_by_token(tokenizer):
    ex = Example(source="### Human: What is 2 + 3? ### Assistant:", target=" 5")
    row = tokenize(ex, tokenizer, 64, 16, train_on_source=False)
    source_ids = tokenizer(tokenizer.bos_token + ex.source, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(ex.target + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert row.input_ids == source_ids + target_ids
    assert row.input_ids[0] == tokenizer.bos_token_id and row.input_ids[-1] == tokenizer.eos_token_id
    assert row.labels == [IGNORE_INDEX] * len(source_ids) + target_ids
    on_source = tokenize(ex, tokenizer, 64, 16, train_on_source=True)
    assert on_source.labels == on_source.input_ids


def test_source_and_target_are_truncated_to_their_own_lengths(tokenizer):
    ex = Example(source="word " * 100, target=" answer" * 50)
    row = tokenize(ex, tokenizer, 10, 6, train_on_source=False)
    assert len(row.input_ids) == 16
    assert row.labels[:10] == [IGNORE_INDEX] * 10 and IGNORE_INDEX not in row.labels[10:]


def test_collate_pads_right_and_masks_padding(tokenizer):
    rows = [tokenize(Example("a b c", " d"), tokenizer, 32, 8, False),
            tokenize(Example("a", " b"), tokenizer, 32, 8, False)]
    batch = collate(rows, tokenizer.pad_token_id)
    n0, n1 = len(rows[0].input_ids), len(rows[1].input_ids)
    assert batch["input_ids"].shape == (2, n0)
    assert batch["attention_mask"][1].tolist() == [1] * n1 + [0] * (n0 - n1)
    assert (batch["labels"][1, n1:] == IGNORE_INDEX).all()


def test_schedule_uses_every_example_once_per_epoch():
    s = BatchSchedule(num_examples=40, global_batch=8, micro_batch=2, rank=0, world_size=1, seed=3)
    first_epoch = [i for step in range(5) for i in s.global_indices(step)]
    assert sorted(first_epoch) == list(range(40))
    second_epoch = [i for step in range(5, 10) for i in s.global_indices(step)]
    assert sorted(second_epoch) == list(range(40)) and second_epoch != first_epoch


def test_schedule_is_the_same_global_batch_for_any_world_size():
    """Ranks' micro-batches together are exactly the global batch, for 1, 2 and 4 ranks."""
    for step in (0, 3, 11):  # 11 crosses an epoch boundary (44 examples, 8 per step)
        expected = BatchSchedule(44, 8, 2, 0, 1, seed=5).global_indices(step)
        for world in (1, 2, 4):
            parts = [mb for r in range(world) for mb in BatchSchedule(44, 8, 2, r, world, 5).micro_batches(step)]
            assert [i for mb in parts for i in mb] == expected
            assert all(len(mb) == 2 for mb in parts)


def test_schedule_resumes_from_the_step_alone():
    a = BatchSchedule(30, 6, 3, 0, 1, seed=9)
    b = BatchSchedule(30, 6, 3, 0, 1, seed=9)  # a fresh process after a restart
    assert [a.micro_batches(s) for s in range(7, 12)] == [b.micro_batches(s) for s in range(7, 12)]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchSchedule(4, 8, 2, 0, 1, seed=0)


def test_builtin_examples_follow_the_guanaco_format():
    from qlora_dist.data.batches import builtin_examples

    cfg = load_config(overrides=["data.num_train=5", "data.num_eval=2", "data.tasks=add"])
    examples, held_out = builtin_examples(cfg)
    assert len(examples) == 5 and len(held_out) == 2
    assert examples[0].source.startswith("### Human: What is ") and examples[0].source.endswith("### Assistant:")
    assert examples[0].target.startswith(" ") and examples[0].target[1:].isdigit()
