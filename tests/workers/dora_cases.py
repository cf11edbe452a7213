"""Run under torchrun: DoRA cases in one process group (imports and DeepSpeed set-up paid once).

usage: dora_cases.py OUT NAME:key=value,... ... -- key=value ...   (the keys after -- apply to all)
  copy=FOLDER among a case's keys: FOLDER (another case's checkpoint) is copied into OUT/NAME first, so the
  case resumes from it (as tests/workers/train_cases.py).
Each case trains into OUT/NAME; rank 0 writes OUT/NAME/magnitudes-start.safetensors (every DoRA magnitude,
gathered, as the engine holds it before the first step) and OUT/NAME/trained_logits.pt (the trained
model's logits on a fixed batch, computed by all ranks under the run's ZeRO stage).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from qlora_dist.compat import quiet_known_warnings, set_library_env


def _magnitudes(trainer) -> dict[str, torch.Tensor] | None:
    """Every DoRA magnitude, whole, on rank 0 (a collective under ZeRO-3)."""
    from qlora_dist.train.checkpoint import adapter_state_dict

    state = adapter_state_dict(trainer.engine.module, trainer.zero_stage)
    # named as in the saved adapter (peft drops the adapter's name: ...lora_magnitude_vector)
    return None if state is None else {n.split(".default")[0]: t.float() for n, t in state.items()
                                       if "lora_magnitude_vector" in n}


def run_case(out: Path, overrides: list[str]) -> None:
    from safetensors.torch import save_file

    from qlora_dist import dist
    from qlora_dist.config import load_config
    from qlora_dist.data.batches import collate
    from qlora_dist.launch.job import prepare
    from qlora_dist.train.trainer import Trainer

    cfg = load_config(overrides=[*overrides, f"train.output_dir={out}"])
    trainer = Trainer(cfg, prepare(cfg))
    trainer.setup()
    start = _magnitudes(trainer)
    if dist.is_main():
        save_file(start, str(out / "magnitudes-start.safetensors"))
    trainer.train()  # saves the adapter at the end, as usual
    batch = collate(trainer.rows[:4], trainer.tokenizer.pad_token_id)
    trainer.engine.eval()
    with torch.no_grad():
        logits = trainer.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    if dist.is_main():
        torch.save({"logits": logits, "batch": batch}, out / "trained_logits.pt")
    dist.barrier()
    trainer.cleanup()


def main(argv: list[str]) -> None:
    set_library_env()
    quiet_known_warnings()
    from train_cases import for_each_case  # this folder is the script's: on sys.path

    for_each_case(argv, run_case)


if __name__ == "__main__":
    main(sys.argv[1:])
    from qlora_dist import dist

    dist.leave(0)  # see compat.exit_without_finalization
