import json

import bitsandbytes as bnb
import pytest
import torch

from qlora_dist.config import load_config
from qlora_dist.errors import ConfigError
from qlora_dist.model.base import add_lora, check_model_folder, load_base, lora_target_names, prepare_for_training
from qlora_dist.precision import DTYPES, dtype_name


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base(tiny_model_dir, bits=4)


def test_base_is_nf4_with_double_quant_and_bf16_compute(base):
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # 2 decoder layers x (q, k, v, o, gate, up, down)
    for layer in layers:
        state = layer.weight.quant_state
        assert state.quant_type == "nf4"
        assert state.nested  # double quantization: the absmax constants are quantized too
        assert layer.compute_dtype == torch.bfloat16
        assert layer.weight.numel() * layer.weight.element_size() == layer.in_features * layer.out_features // 2  # 4 bits each
    assert not isinstance(base.lm_head, bnb.nn.Linear4bit)  # lm_head stays 16-bit, as in the recipe
    assert all(not p.requires_grad for p in base.parameters())


def test_lora_targets_every_linear_layer_but_lm_head_found_by_type(base):
    assert lora_target_names(base) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_lora_wraps_every_linear_layer_and_only_lora_trains(tiny_model_dir):
    cfg = load_config(overrides=["model.path=tiny-llama", "lora.r=4", "lora.alpha=8"])
    model = add_lora(load_base(tiny_model_dir, bits=4), cfg, seed=0)
    prepare_for_training(model, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2  # lora_A and lora_B of every linear layer
    assert all("lora_" in n for n in trainable)
    want = DTYPES[dtype_name(cfg.model.compute_dtype)]  # bf16, or fp32 on a CPU without native bf16
    assert all(p.dtype == want for n, p in model.named_parameters() if p.requires_grad)
    assert model.base_model.model.lm_head.weight.requires_grad is False
    again = add_lora(load_base(tiny_model_dir, bits=4), cfg, seed=0)
    a = dict(model.named_parameters())
    for n, p in again.named_parameters():
        if "lora_A" in n:
            assert torch.equal(p.to(want), a[n])  # seeded init: every rank starts identical


def test_missing_or_wrong_model_folder(tmp_path):
    with pytest.raises(ConfigError, match="model folder not found"):
        check_model_folder(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no config.json"):
        check_model_folder(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match="'gpt2' model"):
        check_model_folder(tmp_path)


def test_rslora_scales_by_alpha_over_sqrt_r_on_the_model_and_in_the_saved_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel

    cfg = load_config(overrides=["model.path=tiny-llama", "lora.r=16", "lora.alpha=8", "lora.rslora=true"])
    model = add_lora(load_base(tiny_model_dir, bits=4), cfg, seed=0)
    scalings = _scalings(model)
    assert scalings == {8 / 16 ** 0.5}  # 2.0; plain LoRA would be alpha / r = 0.5
    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True and saved["use_dora"] is False and saved["r"] == 16
    loaded = PeftModel.from_pretrained(load_base(tiny_model_dir, bits=4), str(tmp_path))
    assert _scalings(loaded) == {2.0}
    plain = add_lora(load_base(tiny_model_dir, bits=4), load_config(overrides=["model.path=tiny-llama", "lora.r=16",
                                                                               "lora.alpha=8"]), seed=0)
    assert _scalings(plain) == {0.5}


def _scalings(model) -> set[float]:
    return {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)}


def test_dora_magnitude_is_peft_s_row_norm_on_one_rank_and_the_loaders_norms_match(tiny_model_dir):
    """On one rank peft computes DoRA's magnitude itself; the layer-wise loader's row norms (what a
    ZeRO-3 run uses instead, model/loader.py) give the same values for the same NF4 weights."""
    from qlora_dist.model.base import load_base_layerwise
    from qlora_dist.model.loader import ROW_NORMS

    cfg = load_config(overrides=["model.path=tiny-llama", "lora.r=4", "lora.alpha=8", "lora.variant=dora",
                                 "model.compute_dtype=bfloat16"])
    peft_model = add_lora(load_base(tiny_model_dir, bits=4), cfg, seed=0)
    layerwise = load_base_layerwise(tiny_model_dir, cfg)
    norms = {name: getattr(m, ROW_NORMS) for name, m in layerwise.named_modules() if hasattr(m, ROW_NORMS)}
    assert len(norms) == 2 * 7
    magnitudes = {n.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0]: p
                  for n, p in peft_model.named_parameters() if "lora_magnitude_vector" in n}
    assert magnitudes.keys() == norms.keys()
    for name, m in magnitudes.items():
        assert torch.equal(m.float(), norms[name]), name  # peft's own value, bit for bit
    prepare_for_training(peft_model, cfg)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert sum("lora_magnitude_vector" in n for n in trainable) == 2 * 7  # the magnitude trains


def test_attention_preset_names_each_familys_attention_projections(tiny_model_dir):
    """lora.target_modules=attention (the paper's Figure 2 baseline): found inside each layer's self_attn."""
    from qlora_dist.config import load_config as _load_config, parse_config
    from qlora_dist.model.base import add_lora, load_base
    from qlora_dist.model.init_adapter import _preset_names

    assert _preset_names("tiny-llama", "attention") == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert _preset_names("tiny:phi3", "attention") == {"qkv_proj", "o_proj"}
    model = add_lora(load_base(tiny_model_dir, bits=16), _load_config(overrides=["lora.target_modules=attention"]), 0)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    _, errs = parse_config(overrides=["lora.target_modules=[attention, up_proj]"])
    assert errs == ["lora.target_modules: 'all-linear' and 'attention' stand alone, not in a list of names "
                    "(got ['attention', 'up_proj'])"]
