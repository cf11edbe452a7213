"""The seed's own loading code reproduces the trained model's logits from a saved adapter."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, free_port

pytestmark = pytest.mark.slow


def _seed_loading_code(base_dir, adapter_dir):
    """Exactly the QLoRA repository's loading path (the issue's acceptance text)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4"), torch_dtype=torch.bfloat16)
    return PeftModel.from_pretrained(model, str(adapter_dir))


def test_saved_adapter_reproduces_trained_logits(tmp_path, tiny_model_dir, monkeypatch):
    from qlora_dist import compat
    from qlora_dist.config import load_config
    from qlora_dist.data.batches import collate
    from qlora_dist.launch.job import prepare
    from qlora_dist.train.trainer import Trainer

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)  # a world of one inside the test process, undone afterwards
    cfg = load_config(overrides=[*TINY, "train.max_steps=12", "train.save_steps=12", f"train.output_dir={tmp_path}"])
    trainer = Trainer(cfg, prepare(cfg))
    try:
        trainer.setup()
        trainer.train()
        batch = collate(trainer.rows[:8], trainer.tokenizer.pad_token_id)
        trained = trainer.engine.module.eval()
        with torch.no_grad():
            want = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            fresh_lora = [p for n, p in trained.named_parameters() if "lora_B" in n]
        assert any(p.abs().sum() > 0 for p in fresh_lora)  # lora_B starts at zero: training moved it
    finally:
        trainer.cleanup()

    loaded = _seed_loading_code(tiny_model_dir, tmp_path / "adapter_model").eval()
    compat.disable_cpu_weight_repacking(loaded)  # the same CPU-only bitsandbytes setting as training
    with torch.no_grad():
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["attention_mask"].bool()
    diff = (got - want)[mask].abs().max().item()
    scale = want[mask].abs().max().item()
    # PEFT loads the bf16 adapter as fp32 (autocast_adapter_dtype) while training ran it in bf16, and
    # bf16 carries ~3 significant digits: allow 1% of the logits' range, far below any training change.
    print(f"adapter logits: max abs diff {diff:.4g}, logit scale {scale:.4g}")
    assert diff <= 0.01 * scale, (diff, scale)
    base_only = loaded.get_base_model()
    with loaded.disable_adapter(), torch.no_grad():
        untuned = base_only(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    assert (untuned - want)[mask].abs().max().item() > 10 * max(diff, 1e-6)  # the adapter does matter
