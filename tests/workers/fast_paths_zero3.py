"""Run under torchrun (ZeRO-3, every rank): on one fixed batch, the loss and some LoRA gradients through
the fast paths (qlora_dist/fastpath.py) and through transformers' and peft's own forward; then two
training steps on the fast paths. Rank 0 writes the numbers as JSON."""
from __future__ import annotations

import json
import sys

import torch

from qlora_dist import compat

compat.set_library_env()
compat.quiet_known_warnings()

from deepspeed.utils import safe_get_full_grad  # noqa: E402

from qlora_dist import dist

from qlora_dist.model import fastpath  # noqa: E402
from qlora_dist.config import load_config  # noqa: E402
from qlora_dist.train.engine import build_ds_config, initialize  # noqa: E402
from qlora_dist.model.base import build_model  # noqa: E402


def loss_and_grads(engine, batch, names: list[str]) -> tuple[float, list[list[float]]]:
    loss = engine(**batch).loss
    engine.backward(loss)
    params = dict(engine.module.named_parameters())
    grads = [safe_get_full_grad(params[n]).float().flatten()[:64].tolist() for n in names]
    engine.optimizer.zero_grad()
    return loss.item(), grads


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config(overrides=[*overrides, "dist.ds_config=zero3", "train.micro_batch_size=2",
                                 "train.global_batch_size=4"])
    info = dist.init()
    ds = build_ds_config(cfg, info.world_size)
    model = build_model(cfg, dist.device_for(info), ds)
    engine = initialize(cfg, model, ds)
    engine.eval()  # no dropout: both paths see the same function
    gen = torch.Generator().manual_seed(info.rank)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=gen)
    labels = ids.clone()
    labels[:, :8] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    names = [n for n, p in engine.module.named_parameters() if p.requires_grad][:4]
    fast = loss_and_grads(engine, batch, names)
    fastpath.set_fused_loss(engine.module, False)
    fastpath.uninstall_fused_lora(engine.module)
    slow = loss_and_grads(engine, batch, names)
    fastpath.set_fused_loss(engine.module, True)
    compat.engine_train_mode(engine)
    losses = []
    for _ in range(2):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    rows = dist.gather_objects({"rank": info.rank, "fast": fast, "slow": slow, "train_losses": losses})
    if info.is_main:
        with open(f"{out}/fast_paths_zero3.json", "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
    dist.leave(0)  # see compat.exit_without_finalization
