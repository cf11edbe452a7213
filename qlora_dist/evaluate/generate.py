"""Inference: batched generation in the prompt format the adapter was trained with (data.chat_template:
the Guanaco format, or the tokenizer's chat template), base in 4-bit (default) or 16-bit."""
from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import torch

from qlora_dist import atomic
from qlora_dist.data.batches import end_of_turn_id
from qlora_dist.data.prompts import CHAT_TEMPLATES, chat_prompt, cut_answer
from qlora_dist.errors import ConfigError, RunFault
from qlora_dist.evaluate.bench_files import Question
from qlora_dist import dist
from qlora_dist.model import adapter_settings, folder
from qlora_dist.model.base import adapter_problems, load_adapter, load_base_for, load_tokenizer
from qlora_dist.model.builtin import resolve_model_path


def _encode_left_padded(tokenizer, texts: list[str], device, bos: bool = True) -> dict[str, torch.Tensor]:
    """BOS + text (the tokenizer's chat template writes its own), padded on the left so every row's
    continuation starts at the same column."""
    bos = (tokenizer.bos_token or "") if bos else ""
    rows = [tokenizer(bos + t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def generate_texts(model, tokenizer, texts: list[str], max_new_tokens: int = 128, batch_size: int = 16,
                   temperature: float = 0.0, top_p: float = 1.0, synced_gpus: bool = False,
                   progress: str | None = None, check_stop=None, chat_template: str = "guanaco") -> list[str]:
    """Continuations of already formatted prompts; greedy unless temperature > 0. progress: the label of
    a progress bar over the batches, on rank 0 only (leave=False: the training step bar stays clean).
    check_stop: called before every batch (on every rank, which must then run equal batch counts); it
    may raise to end the generation there (a preemption). Generation stops at EOS and at the template's
    end-of-turn token (the one training rows end answers with)."""
    from tqdm import tqdm

    device = next(p for p in model.parameters()).device
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    stop = sorted({tokenizer.eos_token_id, end_of_turn_id(tokenizer, chat_template)})
    out: list[str] = []
    starts = tqdm(range(0, len(texts), batch_size), desc=progress, unit="batch", leave=False,
                  disable=progress is None or not dist.is_main())
    for start in starts:
        if check_stop:
            check_stop()
        enc = _encode_left_padded(tokenizer, texts[start:start + batch_size], device, chat_template == "guanaco")
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=stop, use_cache=True, synced_gpus=synced_gpus,
                             **sampling)
        new = gen[:, enc["input_ids"].shape[1]:]
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return out


def load_for_inference(base: str, adapter: str | None = None, bits: int | None = None, compute_dtype: str = "auto",
                       quant_type: str | None = None, double_quant: bool | None = None,
                       allow_base_mismatch: bool = False, tokenizer=None):
    """Base plus an optional PEFT adapter, in eval mode; and its tokenizer (`tokenizer`, where the caller
    has loaded it already, else loaded here). The base is quantized as the
    adapter was trained (its qlora_dist.json, else the recipe's NF4 + double quant); bits, quant_type and
    double_quant override that where not None. compute_dtype: a dtype name or "auto" (by capability).
    An adapter trained on another base is refused before the base loads, unless allow_base_mismatch."""
    path = resolve_model_path(base)
    if adapter and (problems := adapter_problems(Path(adapter), base, allow_mismatch=allow_base_mismatch)):
        raise ConfigError(problems)
    if adapter is None and bits is None and folder.fully_fine_tuned(path):
        bits = 16  # its weights are the trained ones: quantizing them (the recipe's default) would change them
        dist.log(f"{base}: a fully fine-tuned model (train.method=full): loaded in 16 bit (--bits 4 quantizes it)")
    loading = adapter_settings.base_loading(adapter, bits, quant_type, double_quant, compute_dtype)
    device = dist.device_for(dist.read_env()) if torch.cuda.is_available() else None  # this rank's GPU
    model = load_base_for(path, loading, device=device)
    if adapter:
        model = load_adapter(model, Path(adapter), trainable=False)
    model.eval()
    return model, tokenizer if tokenizer is not None else load_tokenizer(path)


def chat_template_of(adapter: str | None, chosen: str | None, tokenizer, base: str) -> str:
    """The prompt format to answer in: `chosen` (--chat-template), else the adapter's (its qlora_dist.json
    prompt_template: the run's data.chat_template), else guanaco."""
    saved = adapter_settings.read(adapter) if adapter else None
    template = chosen or (saved or {}).get("prompt_template", "guanaco")
    why = "--chat-template" if chosen else f"{adapter}/{adapter_settings.FILE}" if saved else "the default"
    if template not in CHAT_TEMPLATES:
        raise ConfigError([f"{adapter}/{adapter_settings.FILE}: prompt_template {template!r} is not one of "
                           f"{', '.join(CHAT_TEMPLATES)}"])
    if template == "tokenizer" and not tokenizer.chat_template:
        raise ConfigError([f"{why}: 'tokenizer', but the tokenizer of {base} has no chat template; "
                           "use --chat-template guanaco"])
    dist.log(f"prompt format: {template} (from {why})")
    return template


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0,
           top_p: float = 1.0, chat_template: str = "guanaco") -> str:
    """One prompt in the inference format of `chat_template` (guanaco: the released models'); the reply."""
    text = generate_texts(model, tokenizer, [chat_prompt(chat_template, tokenizer, [prompt], [])], max_new_tokens,
                          1, temperature, top_p, chat_template=chat_template)[0]
    return cut_answer(text, template=chat_template)


# ------------------------------------------------------------------------------------ prompt files
# FastChat's two question-file schemas, and the answer schema that goes with each:
#   llm_judge (fastchat/llm_judge/data/*/question.jsonl): {question_id, category, turns: [...]}
#     -> {question_id, answer_id, model_id, choices: [{index: 0, turns: [answer per turn]}], tstamp}
#   old eval table (fastchat/eval/table/question.jsonl): {question_id, text, category}
#     -> {question_id, text (the answer), answer_id, model_id, metadata: {}}
SHORTUUID_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"  # shortuuid's default


def random_answer_id() -> str:
    """A 22-character id like FastChat's shortuuid.uuid()."""
    return "".join(secrets.choice(SHORTUUID_ALPHABET) for _ in range(22))


def answer_questions(model, tokenizer, questions: list[Question], max_new_tokens: int = 256,
                     temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8, rank: int = 0,
                     world_size: int = 1, chat_template: str = "guanaco") -> list[list[str]]:
    """Each question's answers, one per turn, in question order on every rank. Question i is answered by
    rank i % world_size (each rank holds the whole model, so ranks need not run equal counts); turn k
    of a conversation is answered with the earlier turns and answers in the prompt."""
    mine = list(range(rank, len(questions), world_size))
    answers = dict(zip(mine, answer_batch(model, tokenizer, [questions[i] for i in mine], max_new_tokens,
                                          temperature, top_p, batch_size, chat_template)))
    merged: dict[int, list[str]] = {}
    for part in dist.gather_objects(answers):
        merged.update(part)
    return [merged[i] for i in range(len(questions))]


def answer_batch(model, tokenizer, questions: list[Question], max_new_tokens: int, temperature: float,
                 top_p: float, batch_size: int, chat_template: str) -> list[list[str]]:
    """The answers of these questions (one per turn) on this rank; turn k of a conversation is answered
    with the earlier turns and answers in the prompt."""
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max((len(q.turns) for q in questions), default=0)):
        todo = [i for i, q in enumerate(questions) if len(q.turns) > turn]
        prompts = [chat_prompt(chat_template, tokenizer, questions[i].turns[:turn + 1], answers[i]) for i in todo]
        texts = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, top_p,
                               chat_template=chat_template)
        for i, text in zip(todo, texts):
            answers[i].append(cut_answer(text, template=chat_template))
    return answers


def answer_records(schema: str, questions: list[Question], answers: list[list[str]], model_id: str) -> list[dict]:
    """Rows of FastChat's answer file for the question file's schema (see the table above)."""
    if schema == "eval_table":
        return [{"question_id": q.question_id, "text": a[0], "answer_id": random_answer_id(), "model_id": model_id,
                 "metadata": {}} for q, a in zip(questions, answers)]
    return [{"question_id": q.question_id, "answer_id": random_answer_id(), "model_id": model_id,
             "choices": [{"index": 0, "turns": a}], "tstamp": time.time()} for q, a in zip(questions, answers)]


def write_jsonl(path: Path, rows: list[dict], option: str = "--out") -> None:
    """The rows into `path` atomically. `option` was checked before the work (atomic.check_output); a
    write that fails anyway (a disk that filled since) is a RunFault naming the path, nothing left behind."""
    try:
        atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    except OSError as exc:
        raise RunFault(f"{option}: could not write {path}: {exc.strerror or exc}") from None
