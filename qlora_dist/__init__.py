"""qlora-dist: distributed QLoRA fine-tuning of LLaMA-family models on DeepSpeed."""

__version__ = "0.1.0"
