"""The seed's dataset schemas, and how each record becomes (source, target) pairs: the one place that
spells them out (as artidoro/qlora's `format_dataset` does, plus the formats it left for "coming soon").

A mapper takes one raw record (a dict) and returns its examples, or raises RowError with the reason
and the field, so a bad row is counted (or, in strict mode, reported with its file and line).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from qlora_dist.config import FORMAT_NAMES
from qlora_dist.data.prompts import Message

# unknown_role and turn_order: chat rows (a role outside the schema's; turns not system?, user, assistant, ...).
# template_mismatch: data.chat_template=tokenizer renders the row's earlier turns differently once later turns
# follow, so its answers cannot be masked one by one (batches._exact_bounds).
SKIP_REASONS = ("bad_json", "non_utf8", "missing_field", "wrong_type", "empty_output", "too_long", "unknown_role",
                "turn_order", "template_mismatch")


class RowError(ValueError):
    def __init__(self, reason: str, field: str | None, detail: str):
        assert reason in SKIP_REASONS, reason
        self.reason, self.field = reason, field
        super().__init__(f"{reason}: {detail}" if field is None else f"{reason} in field {field!r}: {detail}")


@dataclass(frozen=True)
class Example:
    source: str  # the prompt; its labels are masked unless data.train_on_source
    target: str  # what the model learns to produce
    # Chat rows: the conversation (rendered by data.chat_template when tokenized); source and target then
    # hold the non-assistant and the assistant texts, for length checks.
    messages: tuple[Message, ...] = ()


# The Alpaca prompt template of the original QLoRA code (with and without the input block).
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: "
)
CHIP2_HUMAN, CHIP2_BOT = "<human>: ", "\n<bot>: "
# FLAN v2's chain-of-thought source rows (question, answer, rationale) get one of FLAN's CoT templates.
FLAN_COT_SOURCE = "{question}\nLet's think step by step."
FLAN_COT_TARGET = "{rationale} So the answer is {answer}."


def text(record: dict, field: str, allow_empty: bool = True) -> str:
    """A string field of a record, or a RowError naming it."""
    if field not in record or record[field] is None:
        raise RowError("missing_field", field, "absent")
    value = record[field]
    if not isinstance(value, str):
        raise RowError("wrong_type", field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError("empty_output", field, "empty")
    return value


def _items(record: dict, field: str, empty: str = "no instances") -> list[dict]:
    value = record.get(field)
    if value is None:
        raise RowError("missing_field", field, "absent")
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise RowError("wrong_type", field, "expected a list of objects")
    if not value:
        raise RowError("empty_output", field, empty)
    return value


def _input_output(r: dict) -> list[Example]:
    return [Example(text(r, "input"), text(r, "output", allow_empty=False))]


def _alpaca(r: dict) -> list[Example]:
    instruction, extra = text(r, "instruction"), text(r, "input") if "input" in r else ""
    template = ALPACA_PROMPT_INPUT if extra != "" else ALPACA_PROMPT_NO_INPUT
    return [Example(template.format(instruction=instruction, input=extra), text(r, "output", allow_empty=False))]


def _chip2(r: dict) -> list[Example]:
    whole = text(r, "text", allow_empty=False)
    if CHIP2_BOT not in whole:
        raise RowError("missing_field", "text", "no '\\n<bot>: ' turn")
    human, bot = whole.split(CHIP2_BOT)[:2]  # the original keeps the first exchange only
    if not bot.strip():
        raise RowError("empty_output", "text", "empty <bot> turn")
    return [Example(human.replace(CHIP2_HUMAN, ""), bot)]


def _whole_text(field: str) -> Callable[[dict], list[Example]]:
    """HH-RLHF ('chosen') and OASST1 ('text'): trained on the whole conversation, empty source."""
    return lambda r: [Example("", text(r, field, allow_empty=False))]


def _prompt_completion(r: dict) -> list[Example]:
    return [Example(text(r, "prompt"), text(r, "completion", allow_empty=False))]


def _instruction_instances(r: dict) -> list[Example]:
    """Self-Instruct's seed / user-oriented form: one example per instance; instruction, then the
    instance input (when there is one), each followed by a blank line."""
    instruction = text(r, "instruction", allow_empty=False).strip()
    pairs = []
    for inst in _items(r, "instances"):
        extra = text(inst, "input").strip()
        source = f"{instruction}\n\n{extra}\n\n" if extra else f"{instruction}\n\n"
        pairs.append(Example(source, text(inst, "output", allow_empty=False)))
    return pairs


def _unnatural(r: dict) -> list[Example]:
    """Unnatural Instructions: each instance's `instruction_with_input` -> `output` (reformulations not
    used, as in the original's default)."""
    return [Example(text(i, "instruction_with_input"), text(i, "output", allow_empty=False))
            for i in _items(r, "instances")]


def _flan(r: dict) -> list[Example]:
    return [Example(text(r, "inputs"), text(r, "targets", allow_empty=False))]


def _flan_cot(r: dict) -> list[Example]:
    """FLAN's .tsv files escape line breaks as a backslash and 'n' (a tab-separated row is one line)."""
    r = {k: v.replace("\\n", "\n") if isinstance(v, str) else v for k, v in r.items()}
    q, a, why = text(r, "question"), text(r, "answer", allow_empty=False), text(r, "rationale", allow_empty=False)
    return [Example(FLAN_COT_SOURCE.format(question=q), FLAN_COT_TARGET.format(rationale=why, answer=a))]


# Chat schemas: the list's field, each turn's role and content keys, and the roles each name stands for.
MESSAGES_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}  # OpenAI's `messages`
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}


def _turn(item: dict, where: str, role_key: str, content_key: str, roles: dict[str, str]) -> Message:
    role = item.get(role_key)
    if role not in roles:
        raise RowError("unknown_role", f"{where}.{role_key}", f"{role!r}; expected one of {', '.join(roles)}")
    content = item.get(content_key)
    if not isinstance(content, str):
        kind = "absent" if content is None else f"expected a string, got {type(content).__name__}"
        raise RowError("missing_field" if content is None else "wrong_type", f"{where}.{content_key}", kind)
    return Message(roles[role], content)


def _check_order(turns: list[Message], field: str) -> list[Message]:
    """system? then user/assistant alternating from a user turn; a last user turn (no answer) is dropped."""
    start = 1 if turns and turns[0].role == "system" else 0
    for i, m in enumerate(turns[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m.role != expected:
            raise RowError("turn_order", f"{field}[{i}]", f"{m.role} where {expected} was expected (turns go "
                                                          "system?, user, assistant, user, ...)")
        if m.role == "assistant" and not m.content.strip():
            raise RowError("empty_output", f"{field}[{i}]", "empty assistant turn")
    if turns[-1].role != "assistant":
        turns = turns[:-1]
    if not any(m.role == "assistant" for m in turns):
        raise RowError("empty_output", field, "no assistant turn")
    return turns


def _chat(field: str, role_key: str, content_key: str, roles: dict[str, str]) -> Callable[[dict], list[Example]]:
    """A conversation -> one example whose loss covers the assistant turns (batches.tokenize_batch)."""
    def to_example(r: dict) -> list[Example]:
        items = _items(r, field, empty="no turns")
        turns = _check_order([_turn(t, f"{field}[{i}]", role_key, content_key, roles) for i, t in enumerate(items)],
                             field)
        return [Example("\n".join(m.content for m in turns if m.role != "assistant"),
                        "\n".join(m.content for m in turns if m.role == "assistant"), tuple(turns))]
    return to_example


@dataclass(frozen=True)
class Format:
    name: str
    fields: tuple[str, ...]  # the columns that identify it
    to_pairs: Callable[[dict], list[Example]]
    help: str


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("alpaca", ("instruction", "output"), _alpaca, "instruction/input/output with the Alpaca prompt"),
    Format("chip2", ("text",), _chip2, "OIG unified_chip2: '<human>: ...\\n<bot>: ...' text"),
    Format("hh-rlhf", ("chosen",), _whole_text("chosen"), "Anthropic HH-RLHF: the whole 'chosen' text"),
    Format("oasst1", ("text",), _whole_text("text"), "Guanaco/OASST1: the whole '### Human: ... "
                                                     "### Assistant: ...' text"),
    Format("self-instruct", ("prompt", "completion"), _prompt_completion, "Self-Instruct prompt/completion"),
    Format("self-instruct-instances", ("instruction", "instances"), _instruction_instances,
           "Self-Instruct instruction + instances (seed and user-oriented tasks)"),
    Format("unnatural-instructions", ("instances",), _unnatural, "Unnatural Instructions: instances of "
                                                                "instruction_with_input/output"),
    Format("flan-v2", ("inputs", "targets"), _flan, "FLAN v2 inputs/targets"),
    Format("flan-cot", ("question", "answer", "rationale"), _flan_cot, "FLAN v2 CoT source rows (tsv, no header)"),
    Format("input-output", ("input", "output"), _input_output, "generic input/output columns (LongForm too)"),
    Format("messages", ("messages",), _chat("messages", "role", "content", MESSAGES_ROLES),
           "chat: messages of {role: system|user|assistant, content} (OpenAI style)"),
    Format("sharegpt", ("conversations",), _chat("conversations", "from", "value", SHAREGPT_ROLES),
           "ShareGPT chat: conversations of {from: system|human|gpt, value}"),
]}
if tuple(FORMATS) != FORMAT_NAMES:  # config validates data.format against its list: one entry per name, in order
    raise RuntimeError(f"data/formats.py defines {tuple(FORMATS)}, config.FORMAT_NAMES says {FORMAT_NAMES}")

# Named datasets: their HF hub id (read offline from the HF datasets cache) and format.
DATASETS: dict[str, tuple[str, str]] = {
    "alpaca": ("tatsu-lab/alpaca", "alpaca"),
    "alpaca-clean": ("yahma/alpaca-cleaned", "alpaca"),
    "chip2": ("laion/OIG", "chip2"),
    "hh-rlhf": ("Anthropic/hh-rlhf", "hh-rlhf"),
    "unnatural-instructions": ("mrm8488/unnatural-instructions-core", "unnatural-instructions"),
    "longform": ("akoksal/LongForm", "input-output"),
    "self-instruct": ("yizhongw/self_instruct", "self-instruct"),
    "flan-v2": ("SirNeural/flan_v2", "flan-v2"),
    "oasst1": ("timdettmers/openassistant-guanaco", "oasst1"),
}
# The columns of headerless tables (FLAN's CoT .tsv files).
HEADERLESS_COLUMNS = {"flan-cot": ("question", "answer", "rationale")}


def detect(columns: set[str], first: dict | None) -> str | None:
    """The format a record's columns identify, or None when they are ambiguous or unknown.
    'text' alone is chip2 or oasst1, told apart by their turn markers; 'instances' is Self-Instruct's or
    Unnatural Instructions', told apart by the instances' fields. Chat columns come first: chat datasets
    often carry other columns too (an id, a prompt)."""
    for name in ("messages", "sharegpt"):
        if FORMATS[name].fields[0] in columns:
            return name
    if "text" in columns and not columns & {"input", "output", "instruction", "chosen"}:
        sample = first.get("text") if first else None
        if isinstance(sample, str) and sample.lstrip().startswith("<human>:"):
            return "chip2"
        if isinstance(sample, str) and "### Human:" in sample:
            return "oasst1"
        return None
    instances = first.get("instances") if first else None
    if isinstance(instances, list) and instances and isinstance(instances[0], dict):
        return "unnatural-instructions" if "instruction_with_input" in instances[0] else "self-instruct-instances"
    for name in ("hh-rlhf", "self-instruct", "flan-v2", "flan-cot", "alpaca", "input-output"):
        if set(FORMATS[name].fields) <= columns:
            return name
    return None
