"""Inference: batched generation in the Guanaco prompt format, base in 4-bit (default) or 16-bit."""
from __future__ import annotations

from pathlib import Path

import torch

from .model import load_adapter, load_base, load_tokenizer
from .prepare import resolve_model_path
from .prompts import cut_answer, guanaco_inference


def _encode_left_padded(tokenizer, texts: list[str], device) -> dict[str, torch.Tensor]:
    """BOS + text, padded on the left so every row's continuation starts at the same column."""
    bos = tokenizer.bos_token or ""
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
                   temperature: float = 0.0, top_p: float = 1.0, synced_gpus: bool = False) -> list[str]:
    """Continuations of already formatted prompts; greedy unless temperature > 0."""
    device = next(p for p in model.parameters()).device
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        enc = _encode_left_padded(tokenizer, texts[start:start + batch_size], device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, use_cache=True, synced_gpus=synced_gpus,
                             **sampling)
        new = gen[:, enc["input_ids"].shape[1]:]
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return out


def load_for_inference(base: str, adapter: str | None = None, bits: int = 4):
    """Base (4- or 16-bit) plus an optional PEFT adapter, in eval mode; and its tokenizer."""
    path = resolve_model_path(base)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else None
    model = load_base(path, bits=bits, device=device)
    if adapter:
        model = load_adapter(model, Path(adapter), trainable=False)
    model.eval()
    return model, load_tokenizer(path)


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0,
           top_p: float = 1.0) -> str:
    """One prompt in the released models' inference format; the assistant's reply."""
    text = generate_texts(model, tokenizer, [guanaco_inference(prompt)], max_new_tokens, 1, temperature, top_p)[0]
    return cut_answer(text)
