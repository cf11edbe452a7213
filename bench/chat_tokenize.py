"""Chat tokenizing speed with the model's own template (data.chat_template=tokenizer): the fast split of
data/batches.py (each conversation encoded once, each prefix's tail checked) against the exact one (every
turn prefix tokenized), on real conversations, timed with the same call in the same process.

Conversations come from ../shared/data (see its SOURCES.md): OASST1 (`oa_questions.jsonl`: the whole
'### Human: ... ### Assistant: ...' text, 1-3 user turns, plus its best reply) or HH-RLHF (harmless-base
test, the 'chosen' dialogues, 1-18 user turns). Every other one gets a system message, so templates that
write their own default system line (SmolLM2's) are timed both ways. Both splits must give the same ids and
labels for every row, or the bench fails.

  python bench/chat_tokenize.py                                  # SmolLM2, 900 OASST1 conversations
  python bench/chat_tokenize.py --data hh-rlhf --model tiny-llama --repeat 5

2026-12-02, 09:50 UTC, 2 EPYC cores, load average 0.4-1.1, one tokenizer thread, 900 conversations, CPU s
(exact -> fast): SmolLM2 OASST1 1.013 -> 0.590 (1.71x), HH-RLHF 1.127 -> 0.471 (2.39x); tiny-llama with
LLAMA2_TEMPLATE OASST1 1.063 -> 0.685 (1.55x), HH-RLHF 1.068 -> 0.412 (2.60x); every row identical, no
fallback. The floor on OASST1 (1.47 answers a conversation, long ones): encoding each whole conversation
once takes 0.486 s of the fast split's 0.590 (the exact split encodes 1.86x the characters, counted on the
first 300): no split can be 5x faster there.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("QLORA_DIST_CACHE", str(REPO / ".cache" / "models"))
# One thread, as in the cache's forked workers (data/corpus.py) that tokenize big files: CPU seconds then
# measure the work, whatever else runs on the machine.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from qlora_dist.data.formats import Example  # noqa: E402
from qlora_dist.data.prompts import GUANACO_SYSTEM, Message  # noqa: E402

DATA = REPO.parent / "shared" / "data"
FILES = {"oasst1": DATA / "oasst_guanaco" / "oa_questions.jsonl",
         "hh-rlhf": DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"}
TURN_MARKERS = {"oasst1": r" ?### (Human|Assistant): ?", "hh-rlhf": r"\n\n(Human|Assistant): ?"}
# A Llama-2-chat style template for the tiny tokenizers (they ship none): BOS and EOS inside the text, the
# system prompt folded into the first user turn, the answer ending with EOS and nothing after it.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set sys = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (sys if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")


def conversations(name: str, n: int) -> list[tuple[Message, ...]]:
    """Up to n conversations of a file of ../shared/data, each ending with an answer."""
    opener = gzip.open if FILES[name].suffix == ".gz" else open
    with opener(FILES[name], "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out = []
    for k, r in enumerate(rows[:n]):
        text = r["text"] if name == "oasst1" else r["chosen"]
        parts = re.split(TURN_MARKERS[name], text)[1:]
        turns = [Message("user" if who == "Human" else "assistant", said.strip())
                 for who, said in zip(parts[0::2], parts[1::2])]
        if name == "oasst1":
            turns.append(Message("assistant", r["output"].strip()))
        turns = [m for m in turns if m.content]
        while turns and turns[-1].role != "assistant":
            turns.pop()
        if turns:
            out.append(((Message("system", GUANACO_SYSTEM),) if k % 2 == 0 else ()) + tuple(turns))
    return out


def load_template_tokenizer(model: str):
    """The tokenizer of model.path `model`, with LLAMA2_TEMPLATE where it has no chat template."""
    from qlora_dist.model.base import load_tokenizer

    tokenizer = load_tokenizer(model)
    if not tokenizer.chat_template:
        tokenizer.chat_template = LLAMA2_TEMPLATE
    return tokenizer


def timed(examples: list[Example], tokenizer, exact: bool, repeat: int):
    """The rows and the best (wall, CPU) seconds of `repeat` calls of tokenize_chats (512 + 512 tokens)."""
    from qlora_dist.data.batches import tokenize_chats

    wall = cpu = float("inf")
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        rows = tokenize_chats(examples, tokenizer, 512, 512, False, chat_template="tokenizer", exact=exact)
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return rows, wall, cpu


def main() -> None:
    from qlora_dist.data.batches import TEMPLATE_SPLITS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=sorted(FILES), default="oasst1")
    ap.add_argument("--model", default="smollm2", help="model.path of the tokenizer (default smollm2)")
    ap.add_argument("-n", type=int, default=900, help="conversations (default 900)")
    ap.add_argument("--repeat", type=int, default=3, help="calls per split; the best is kept (default 3)")
    args = ap.parse_args()
    convs = conversations(args.data, args.n)
    examples = [Example("", "", c) for c in convs]
    tokenizer = load_template_tokenizer(args.model)
    timed(examples[:50], tokenizer, False, 1)  # warm up: the template's compilation, the tokenizer's caches
    exact_rows, exact_s, exact_cpu = timed(examples, tokenizer, True, args.repeat)
    TEMPLATE_SPLITS.clear()
    fast_rows, fast_s, fast_cpu = timed(examples, tokenizer, False, args.repeat)
    same = sum((a.input_ids, a.labels, a.skip) == (b.input_ids, b.labels, b.skip) for a, b in zip(exact_rows, fast_rows))
    tokens = sum(len(r.input_ids) for r in exact_rows)
    turns = sum(m.role == "assistant" for c in convs for m in c)
    print(json.dumps({"data": args.data, "model": args.model, "conversations": len(convs), "answers": turns,
                      "row_tokens": tokens, "skipped": sum(r.skip is not None for r in exact_rows),
                      "exact_conv_per_s": round(len(convs) / exact_s, 1),
                      "fast_conv_per_s": round(len(convs) / fast_s, 1), "speedup": round(exact_s / fast_s, 2),
                      "exact_cpu_s": round(exact_cpu, 3), "fast_cpu_s": round(fast_cpu, 3),
                      "speedup_cpu": round(exact_cpu / fast_cpu, 2),
                      "fast_split_fell_back": TEMPLATE_SPLITS["exact"] // args.repeat,
                      "rows_identical": f"{same}/{len(convs)}",
                      "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM"),
                      "load_average": os.getloadavg()[0]}))
    if same != len(convs):
        sys.exit("the fast split's rows differ from the exact split's")


if __name__ == "__main__":
    main()
