"""The model: a local Hugging Face folder of a tested family (model/folder.py TESTED_FAMILIES: LLaMA 1-3,
Mistral, Qwen2, Qwen3, Gemma-2, Phi-3) loaded in NF4 (double quant, bf16 compute), LoRA on every linear layer.

Loading goes through transformers' `from_pretrained` with a `BitsAndBytesConfig`, exactly as the seed's own
loading code does, or through our layer-wise loader (model/loader.py) under ZeRO-3.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qlora_dist import compat
from qlora_dist.config import Config
from qlora_dist.errors import ConfigError
from qlora_dist.model import adapter_init, folder
from qlora_dist.model.builtin import random_llama_config, random_size, resolve_model_path, tokenizer_folder
from qlora_dist.model.loader import ROW_NORMS
from qlora_dist.precision import DTYPES, dtype_name, quantization_config


def check_model_folder(path: Path, key: str = "model.path") -> None:
    """Every problem of the folder that needs no weight read (model/folder.py), raised at once."""
    if errs := folder.problems(path, key):
        raise ConfigError(errs)


def load_base(path: Path, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
              compute_dtype: str = "bfloat16", attn_implementation: str = "sdpa", device=None):
    """The frozen base model, quantized on load unless bits == 16."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_dist.model.loader import attention_for

    check_model_folder(path)
    attn_implementation = attention_for(AutoConfig.from_pretrained(path), attn_implementation)
    kwargs = {}
    if device is not None and device.type == "cuda":
        kwargs["device_map"] = {"": device.index}
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[compute_dtype], attn_implementation=attn_implementation,
        quantization_config=quantization_config(bits, quant_type, double_quant, compute_dtype), **kwargs)
    compat.disable_cpu_weight_repacking(model)
    model.requires_grad_(False)
    return model


def load_base_for(path: Path, loading, device=None):
    """The base an adapter was trained on, for inference (loading: adapter_settings.BaseLoading): as
    transformers loads it, or, for a LoftQ / PiSSA adapter, rebuilt from the original weights by the
    layer-wise loader with the recorded start (the same bytes as in training: tests/test_adapter_init.py)."""
    if loading.init is None:
        return load_base(path, loading.bits, loading.quant_type, loading.double_quant, loading.compute_dtype,
                         device=device)
    from transformers import AutoConfig

    from qlora_dist.model.loader import SafetensorsSource, load_layerwise

    check_model_folder(path)
    return load_layerwise(AutoConfig.from_pretrained(path), SafetensorsSource(path), loading.bits,
                          loading.quant_type, loading.double_quant, loading.compute_dtype, device,
                          init=loading.init)


def load_tokenizer(path: Path | str):
    """The tokenizer of a model folder (or of a `random:` model: see model/builtin.py)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(path))
    if tokenizer.pad_token is None:
        # Llama-3 (and others) ship no pad token. Padding positions are masked by length (attention and
        # labels: data/batches.py collate), never by id, so reusing EOS as padding keeps each example's own
        # EOS label; a new token would mean resizing the embeddings, which would change the base model.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_target_names(model: torch.nn.Module) -> list[str]:
    """Names (last component) of every linear layer but lm_head, found by type, not by name."""
    import bitsandbytes as bnb

    linear_types = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, linear_types) and not name.endswith("lm_head")}
    return sorted(names)


def attention_target_names(model: torch.nn.Module) -> list[str]:
    """Names (last component) of the linear layers inside each decoder layer's attention module (`self_attn`
    in every tested family): LLaMA, Mistral, Qwen, Gemma q/k/v/o_proj; Phi-3 qkv_proj, o_proj. Found by
    where they sit, not from a table of names, so a family's own names come with it."""
    import bitsandbytes as bnb

    linear_types = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, linear_types) and name.rsplit(".", 1)[0].endswith("self_attn")})


# lora.target_modules presets (config.TARGET_PRESET_NAMES): what each names on a model (the paper's Figure 2
# compares the two).
TARGET_PRESETS = {"all-linear": lora_target_names, "attention": attention_target_names}


def add_lora(model: torch.nn.Module, cfg: Config, seed: int):
    """Wrap the base in a PEFT LoRA model; LoRA init is seeded so every rank starts identical."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora.target_modules
    if len(targets) == 1 and targets[0] in TARGET_PRESETS:
        targets = TARGET_PRESETS[targets[0]](model)
    # The variant and the scaling are peft's own (use_dora, use_rslora), so they are recorded in the saved
    # adapter_config.json and any peft reader rebuilds the same adapter.
    # LoftQ and PiSSA start from weights the loader computed (model/adapter_init.py): peft builds the
    # layers with its default start, which place_init_weights then replaces; the saved adapter_config
    # says init_lora_weights=true so no peft reader re-runs an init on load (qlora_dist.json records ours).
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM",
                      use_dora=cfg.lora.variant == "dora", use_rslora=cfg.lora.rslora,
                      init_lora_weights=adapter_init.PEFT_INIT[cfg.lora.init])
    torch.manual_seed(seed)
    with compat.dora_magnitude_from_row_norms(ROW_NORMS):
        peft_model = get_peft_model(model, lora)
    placed = adapter_init.place_init_weights(peft_model)
    if cfg.lora.init in adapter_init.BASE_CHANGING and not placed:
        raise RuntimeError(f"lora.init={cfg.lora.init}: the base was not loaded by the layer-wise loader "
                           "with the start computed (model.build_model picks it)")
    return _dora_ready(peft_model)


def load_adapter(model: torch.nn.Module, adapter_dir: Path, trainable: bool):
    """A base with a saved PEFT adapter on top (its own adapter_config decides r, alpha, targets, variant)."""
    from peft import PeftModel

    check_adapter(Path(adapter_dir))
    adapter_init.drop_init_weights(model)  # a rebuilt LoftQ / PiSSA base: the adapter's weights replace its start
    with compat.dora_magnitude_from_row_norms(ROW_NORMS):
        return _dora_ready(PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable))


def _dora_ready(model):
    """A DoRA model's layers read their base weight in their own forward too: keep it gathered there
    under ZeRO-3, and read it without replacing it (compat). Nothing changes for plain LoRA. The loader's
    row norms are spent once the magnitudes exist: freed (65B: ~30 MB of fp32 per rank)."""
    if compat.gather_base_weight_in_dora_forward(model):
        compat.dora_dequantize_in_place()
    for module in model.modules():
        module.__dict__.pop(ROW_NORMS, None)
    return model


def check_adapter(adapter_dir: Path) -> None:
    """A PEFT adapter folder whose weights file is whole (header against length): a truncated one is a
    line naming the file, not a SafetensorError traceback. Cheap: call it before loading a base."""
    if problems := adapter_problems(adapter_dir):
        raise ConfigError(problems)


def adapter_problems(adapter_dir: Path, base: str | None = None, option: str = "--adapter",
                     allow_mismatch: bool = False, override: str = "--allow-base-mismatch") -> list[str]:
    """check_adapter's problems, and (given the base's model.path) whether the adapter was trained on
    another base (adapter_settings.base_problems; with allow_mismatch only logged): read without a weight."""
    from qlora_dist.model import adapter_settings
    from qlora_dist.model.folder import safetensors_problems

    adapter_dir = Path(adapter_dir)
    if folder.fully_fine_tuned(adapter_dir):
        return [folder.not_an_adapter(adapter_dir, option)]
    if not (adapter_dir / "adapter_config.json").is_file():
        what = "not found" if not adapter_dir.exists() else "has no adapter_config.json (not a PEFT adapter)"
        return [f"{option}: adapter folder {adapter_dir} {what}"]
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file() and (problems := safetensors_problems(weights, option)):
        return problems
    if base is None:
        return []
    return adapter_settings.base_problems(adapter_dir, base, option, override, allowed=allow_mismatch)


def prepare_for_training(model: torch.nn.Module, cfg: Config) -> None:
    """What peft's prepare_model_for_kbit_training does, minus its fp32 upcast of the base's 16-bit
    weights (that upcast doubles their memory and breaks ZeRO-3's already partitioned parameters)."""
    full = cfg.train.method == "full"
    for name, param in model.named_parameters():
        param.requires_grad_(full or "lora_" in name)  # DoRA's magnitude too: lora_magnitude_vector
    # LoRA weights in one dtype, the model's: ZeRO-3 needs it, and the engine keeps fp32 masters.
    # DoRA's magnitude included, although TRL #7268 found a bf16 magnitude frozen: there the optimizer
    # updated the bf16 values themselves, and steps below bf16's resolution (0.4%) vanished. Here the
    # optimizer steps DeepSpeed's fp32 master of it and the bf16 copy follows, so updates accumulate
    # (tests/test_dora.py checks it changes). An fp32 magnitude in the module is not possible under
    # deepspeed 0.19.8 anyway: ZeRO-3 refuses mixed dtypes (defragment: one dtype), ZeRO-1/2 cast every
    # parameter to bf16 at initialize.
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.to(DTYPES[dtype_name(cfg.model.compute_dtype)])
    if cfg.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    from qlora_dist.model import fastpath

    from qlora_dist import dist

    if cfg.model.fused_loss and not fastpath.install_fused_loss(model):  # needs lm_head frozen, as just set
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # full: no PEFT wrapper
        dist.log(f"model.fused_loss: not used ({fastpath.fused_loss_refusal(causal_lm)}): "
                 "transformers' loss instead")
    if cfg.model.fused_lora:
        fastpath.install_fused_lora(model)
    if cfg.model.compile_kernels and not fastpath.install_compiled_kernels(model):
        dist.log("model.compile_kernels: LLaMA's modules only; this model keeps transformers' eager kernels")
    from qlora_dist.model.longseq import install_tiled_mlp

    install_tiled_mlp(model, cfg.model.tiled_mlp)  # after the kernels: it wraps the MLP forward in place


def use_layerwise(cfg: Config, zero_stage: int) -> bool:
    """LoftQ and PiSSA need each layer's 16-bit weights before quantization: only our loader has them."""
    return cfg.model.loader == "layerwise" or (cfg.model.loader == "auto" and (
        zero_stage == 3 or cfg.lora.init in adapter_init.BASE_CHANGING))


def loads_layerwise(cfg: Config, zero_stage: int) -> bool:
    """Whether build_model goes through the layer-wise loader (a `random:` model always does)."""
    return bool(random_size(cfg.model.path)) or use_layerwise(cfg, zero_stage)


def load_base_layerwise(path: Path, cfg: Config, device=None, ds_config: dict | None = None, on_piece=None):
    """The base through our layer-wise loader (partitioned while loading when ds_config is ZeRO-3)."""
    from transformers import AutoConfig

    from qlora_dist.model.loader import SafetensorsSource, load_layerwise

    check_model_folder(path)
    q = cfg.quantization
    return load_layerwise(AutoConfig.from_pretrained(path), SafetensorsSource(path), q.bits, q.quant_type,
                          q.double_quant, dtype_name(cfg.model.compute_dtype), device, ds_config, cfg.model.attn_implementation,
                          on_piece, keep_row_norms=cfg.lora.variant == "dora", init=adapter_init.from_config(cfg))


def load_base_random(size: str, cfg: Config, device=None, ds_config: dict | None = None, on_piece=None):
    """Random weights of a LLaMA size (`model.path=random:<size>`), the same for every run (seed 0), through
    the layer-wise loader: made and quantized on `device`, partitioned as they go when ds_config is ZeRO-3."""
    from qlora_dist.model.loader import RandomSource, load_layerwise

    q = cfg.quantization
    return load_layerwise(random_llama_config(size), RandomSource(), q.bits, q.quant_type, q.double_quant,
                          dtype_name(cfg.model.compute_dtype), device, ds_config, cfg.model.attn_implementation, on_piece,
                          keep_row_norms=cfg.lora.variant == "dora", init=adapter_init.from_config(cfg))


def build_model(cfg: Config, device=None, ds_config: dict | None = None, on_piece=None):
    """Base + LoRA (fresh, or from train.init_adapter), or under train.method=full the 16-bit base with every
    weight trainable, ready for the engine. on_piece(name): called on
    every rank after each piece the layer-wise loader loads (the trainer's stop point; it may raise)."""
    from qlora_dist.ds_files import zero_stage

    path = resolve_model_path(cfg.model.path)
    stage = zero_stage(ds_config or {})
    if size := random_size(cfg.model.path):  # no folder: always the layer-wise loader
        base = load_base_random(size, cfg, device, ds_config if stage == 3 else None, on_piece)
    elif use_layerwise(cfg, stage):
        base = load_base_layerwise(path, cfg, device, ds_config if stage == 3 else None, on_piece)
    else:
        base = load_base(path, cfg.quantization.bits, cfg.quantization.quant_type, cfg.quantization.double_quant,
                         dtype_name(cfg.model.compute_dtype), cfg.model.attn_implementation, device)
    if cfg.train.method == "full":  # every weight trained: the 16-bit base is the model (config resolved bits=16)
        model = base
    elif cfg.train.init_adapter:
        model = load_adapter(base, Path(cfg.train.init_adapter), trainable=True)
    else:
        model = add_lora(base, cfg, cfg.train.seed)
    prepare_for_training(model, cfg)
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) weight counts: ZeRO-3 partitioned parameters count whole (ds_numel), packed
    4-bit parameters count their weights (quant_state.shape), not their storage elements."""
    def numel(p):
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        return shape.numel() if shape is not None else getattr(p, "ds_numel", p.numel())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(numel(p) for p in model.parameters())
