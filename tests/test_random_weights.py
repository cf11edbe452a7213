"""`model.path=random:<size>`: random weights of a LLaMA shape for benchmarks (qlora_dist/model/builtin.py).

7B is never materialised here: its name, config, planner shape and plan are checked; the loader itself
runs on the hidden CPU-sized shape `random:smoke` (the bench's --dry-run runs it through the Trainer)."""
from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from qlora_dist import memory
from qlora_dist.config import load_config
from qlora_dist.errors import ConfigError
from qlora_dist.model.builtin import random_llama_config, random_size


def test_random_names_are_read_in_one_place():
    assert random_size("random:7b") == "7b" and random_size("random:65b") == "65b"
    assert random_size("smollm2") is None and random_size(None) is None and random_size("/models/random") is None
    with pytest.raises(ConfigError, match="random:7b, random:13b, random:33b, random:65b"):
        random_size("random:8b")


def test_random_7b_is_llama_1_7b():
    c = random_llama_config("7b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (4096, 11008, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (32, 32, 32000)
    assert not c.tie_word_embeddings
    cfg = load_config(overrides=["model.path=random:7b"])
    assert memory.shape_for(cfg) == memory.Shape.llama("7b")


def test_random_tokenizer_ids_index_the_embedding():
    from qlora_dist.model.base import load_tokenizer

    tokenizer = load_tokenizer("random:65b")  # tiny-llama's byte-level BPE
    assert len(tokenizer) <= 32000 and max(tokenizer.get_vocab().values()) < 32000


def test_plan_of_random_7b():
    out = run_cli("plan", "model.path=random:7b", "--world-size", "1", "--gpu-memory", "24GB").stdout
    assert "32 layers x 4096 hidden" in out and "fits" in out


def test_build_model_on_random_weights():
    import bitsandbytes as bnb

    from qlora_dist.model.base import build_model, load_tokenizer

    cfg = load_config(overrides=["model.path=random:smoke", "lora.r=4", "model.compute_dtype=bfloat16"])
    model = build_model(cfg, torch.device("cpu"))
    base = model.get_base_model()
    assert isinstance(base.model.layers[0].mlp.down_proj.base_layer, bnb.nn.Linear4bit)
    assert base.config.vocab_size == 32000
    ids = load_tokenizer(cfg.model.path)(["12 + 34 ="], return_tensors="pt")["input_ids"]
    loss = model(input_ids=ids, labels=ids).loss
    assert 9.5 < loss.item() < 11.5  # near ln(32000) = 10.4: random weights predict uniformly
