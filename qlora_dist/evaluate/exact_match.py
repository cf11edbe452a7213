"""Held-out exact match on the built-in tasks: greedy answers, sharded across ranks, gathered once."""
from __future__ import annotations

from collections import defaultdict

from qlora_dist.data.prompts import cut_answer, guanaco_turn
from qlora_dist.data.tasks import TaskItem, exact_match, majority_baseline
from qlora_dist.evaluate.generate import generate_texts
from qlora_dist import dist


def builtin_accuracy(model, tokenizer, items: list[TaskItem], batch_size: int, max_new_tokens: int,
                     rank: int = 0, world_size: int = 1, synced_gpus: bool = False,
                     check_stop=None) -> dict[str, dict]:
    """{task: {accuracy, correct, n, majority_baseline}} plus 'mean'; identical on every rank.
    Each question is answered by exactly one rank. Under ZeRO-3 every rank must run the same number of
    forward passes (each one gathers parameters collectively), so shorter shards are padded with a
    repeat whose answer is then dropped; the padding also gives every rank the same number of batches,
    so check_stop (called before each, may raise: see generate_texts) is reached alike on every rank."""
    mine = items[rank::world_size]
    per_rank = -(-len(items) // world_size)
    prompts = [guanaco_turn(i.prompt) for i in mine]
    prompts += prompts[:1] * (per_rank - len(mine)) if prompts else [guanaco_turn(items[0].prompt)] * per_rank
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size, synced_gpus=synced_gpus,
                           progress="held-out eval", check_stop=check_stop)
    local = [(i.task, exact_match(cut_answer(t, first_line=True), i.answer)) for i, t in zip(mine, texts)]
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for rank_results in dist.gather_objects(local):
        for task, ok in rank_results:
            total[task] += 1
            correct[task] += int(ok)
    by_task = {t: [i for i in items if i.task == t] for t in total}
    report = {t: {"accuracy": correct[t] / total[t], "correct": correct[t], "n": total[t],
                  "majority_baseline": majority_baseline(by_task[t])} for t in sorted(total)}
    report["mean"] = {"accuracy": sum(r["accuracy"] for r in report.values()) / max(len(report), 1)}
    return report


def format_report(report: dict[str, dict], title: str) -> str:
    lines = [title]
    for task, r in report.items():
        if task == "mean":
            continue
        lines.append(f"  {task:<12} {100 * r['accuracy']:5.1f}%  ({r['correct']}/{r['n']}; "
                     f"always-most-common-answer baseline {100 * r['majority_baseline']:.1f}%)")
    lines.append(f"  {'mean':<12} {100 * report['mean']['accuracy']:5.1f}%")
    return "\n".join(lines)
