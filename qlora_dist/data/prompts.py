"""Prompt formats: the one place that spells them out.

The Guanaco format is the one the released QLoRA models were trained and served with
(../shared/RECIPE.md). Training rows use the bare `### Human: ... ### Assistant:` turn; inference
prepends the system line, as the released inference example does.

Chat data (data.chat_template) is rendered either in that format (`guanaco`: a system line only where
the data has one; every answer ends with EOS, which is trained and is `generate`'s stop token) or with
the tokenizer's own chat template (`tokenizer`, e.g. SmolLM2-Instruct's ChatML).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

GUANACO_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
HUMAN_TAG = "### Human:"
ASSISTANT_TAG = "### Assistant:"
CHAT_TEMPLATES = ("guanaco", "tokenizer")


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str


def guanaco_turn(prompt: str) -> str:
    """One human turn, ending where the assistant's answer starts (training rows)."""
    return f"{HUMAN_TAG} {prompt} {ASSISTANT_TAG}"


def guanaco_segments(messages: Sequence[Message], end: str = "") -> list[tuple[str, bool]]:
    """A conversation in the Guanaco format as (text, is the assistant's) pieces, each tokenized on its own
    as the seed tokenizes source and target apart: [system line] '### Human: q ### Assistant:', ' a', end,
    ' ### Human: ...'. One exchange without a system line is the seed's training row (source, ' ' + target,
    EOS). `end` follows every answer: EOS in training rows; inference prompts put it where training did."""
    pieces, lead = [], ""
    for m in messages:
        if m.role == "system":
            lead = f"{m.content}\n"
        elif m.role == "user":
            pieces.append((lead + guanaco_turn(m.content), False))
        else:
            pieces += [(f" {m.content}", True), (end, True)]
            lead = " "
    return pieces


def as_messages(turns: Sequence[str], answers: Sequence[str], system: str | None = None) -> list[Message]:
    """User turns and the assistant's answers to all but the last, interleaved (after a system message)."""
    assert len(answers) == len(turns) - 1, (len(turns), len(answers))
    msgs = [Message("system", system)] if system else []
    for i, turn in enumerate(turns):
        msgs.append(Message("user", turn))
        if i < len(answers):
            msgs.append(Message("assistant", answers[i]))
    return msgs


def guanaco_conversation(turns: list[str], answers: list[str], end: str = "") -> str:
    """A multi-turn inference prompt: system line, each earlier human turn with the assistant's answer
    (and `end`, as in training rows), then the last human turn, ending where the assistant answers it."""
    return "".join(text for text, _ in guanaco_segments(as_messages(turns, answers, GUANACO_SYSTEM), end))


def guanaco_inference(prompt: str) -> str:
    """The released models' inference prompt: system line, then the human turn."""
    return guanaco_conversation([prompt], [])


def template_text(tokenizer, messages: Sequence[Message], generation_prompt: bool = False) -> str:
    """The tokenizer's own chat template, rendered as text (special tokens spelled out)."""
    return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                         tokenize=False, add_generation_prompt=generation_prompt)


def chat_prompt(template: str, tokenizer, turns: list[str], answers: list[str]) -> str:
    """The inference prompt of data.chat_template `template` (generate): Guanaco's with its system line and
    EOS after earlier answers, or the tokenizer's template ending where the assistant answers."""
    if template == "guanaco":
        return guanaco_conversation(turns, answers, end=tokenizer.eos_token)
    return template_text(tokenizer, as_messages(turns, answers), generation_prompt=True)


def cut_answer(generated: str, first_line: bool = False, template: str = "guanaco") -> str:
    """The assistant's answer from generated text: stop where the model starts the next turn
    (and, for one-line answers, at the first line break). The tokenizer's template ends a turn with a
    special token (the stop token; skipped in decoding), so its answers may contain '###'."""
    if template == "guanaco":
        generated = generated.split("###", 1)[0]
    if first_line:
        generated = generated.strip().split("\n", 1)[0]
    return generated.strip()
