"""Prompt formats: the one place that spells them out.

The Guanaco format is the one the released QLoRA models were trained and served with
(../shared/RECIPE.md). Training rows use the bare `### Human: ... ### Assistant:` turn; inference
prepends the system line, as the released inference example does.
"""
from __future__ import annotations

GUANACO_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
HUMAN_TAG = "### Human:"
ASSISTANT_TAG = "### Assistant:"


def guanaco_turn(prompt: str) -> str:
    """One human turn, ending where the assistant's answer starts (training rows)."""
    return f"{HUMAN_TAG} {prompt} {ASSISTANT_TAG}"


def guanaco_inference(prompt: str) -> str:
    """The released models' inference prompt: system line, then the human turn."""
    return f"{GUANACO_SYSTEM}\n{guanaco_turn(prompt)}"


def guanaco_conversation(turns: list[str], answers: list[str]) -> str:
    """A multi-turn inference prompt: system line, each earlier human turn with the assistant's answer,
    then the last human turn, ending where the assistant answers it. One turn: guanaco_inference."""
    assert len(answers) == len(turns) - 1, (len(turns), len(answers))
    earlier = "".join(f"{guanaco_turn(t)} {a} " for t, a in zip(turns, answers))
    return f"{GUANACO_SYSTEM}\n{earlier}{guanaco_turn(turns[-1])}"


def cut_answer(generated: str, first_line: bool = False) -> str:
    """The assistant's answer from generated text: stop where the model starts the next turn
    (and, for one-line answers, at the first line break)."""
    generated = generated.split("###", 1)[0]
    if first_line:
        generated = generated.strip().split("\n", 1)[0]
    return generated.strip()
