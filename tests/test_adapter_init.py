"""lora.init (model/adapter_init.py): LoftQ's and PiSSA's maths on a small layer, and on one rank the whole
path: trained by the real Trainer, saved in peft's format, the base rebuilt byte for byte from the original
weights, the trained logits reproduced; PiSSA's conversion to a plain LoRA (exact on 16 bits, measured on NF4).
The 2-rank ZeRO-3 runs of both are cases of tests/test_dora.py's launch."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, free_port

QUANT = {"compute_dtype": torch.bfloat16, "quant_type": "nf4", "double_quant": True}


def _small_layer() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(96, 64, generator=gen) * 0.02).to(torch.bfloat16)


def _best_rank_r(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The truncated SVD in float64 (independent of the code under test) and the error it leaves."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r], s[r:].square().sum().sqrt()


def test_loftq_each_step_is_the_best_rank_r_approximation_of_the_quantization_error():
    from qlora_dist.model.adapter_init import loftq_steps, quantize_roundtrip, scaling

    w, r = _small_layer(), 4
    s = scaling(16, r, rslora=False)  # 4: a B·A without the scaling would be 4x off
    errors = []
    for step, (pre, a, b) in enumerate(loftq_steps(w, r, s, 3, QUANT)):
        residual = w.double() - quantize_roundtrip(pre, QUANT).double()
        best, tail = _best_rank_r(residual, r)
        low = s * (b.double() @ a.double())
        gap = (low - best).abs().max().item()
        print(f"step {step + 1}: |s·BA - SVD_r| = {gap:.3g}, error left {torch.linalg.norm(residual - low):.5f}")
        assert gap < 1e-4 * best.abs().max().item()  # fp32 SVD against float64; a lost scaling: 75%
        assert torch.linalg.norm(residual - low).item() == pytest.approx(tail.item(), rel=1e-5)
        errors.append(torch.linalg.norm(residual - low).item())
    plain = torch.linalg.norm(w.double() - quantize_roundtrip(w, QUANT).double()).item()
    print(f"NF4 error {plain:.5f}; LoftQ's over 3 steps {[round(e, 5) for e in errors]}")
    assert errors[-1] < 0.97 * plain  # the adapter takes up part of what NF4 lost


def test_pissa_takes_the_top_r_singular_part_and_leaves_the_residual():
    from qlora_dist.model.adapter_init import pissa, scaling

    w, r = _small_layer(), 4
    s = scaling(8, r, rslora=True)
    residual, a, b = pissa(w, r, s)
    best, _ = _best_rank_r(w, r)
    assert (s * (b.double() @ a.double()) - best).abs().max().item() < 1e-4 * best.abs().max().item()
    assert residual.dtype == torch.bfloat16
    exact = w.double() - s * (b.double() @ a.double())
    assert bool(((residual.double() - exact).abs() <= 2**-8 * exact.abs() + 1e-9).all())  # bf16 rounding only


def test_gaussian_start_is_peft_s_and_leaves_the_base_alone(tmp_path):
    """lora.init=gaussian: A normal with std 1/r, B zero (peft's own), recorded in adapter_config.json; the
    base is the transformers-loaded one (no rebuild)."""
    from qlora_dist.config import load_config
    from qlora_dist.model.base import build_model

    model = build_model(load_config(overrides=[*TINY, "lora.init=gaussian", "model.compute_dtype=float32"]))
    a = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_A" in n])
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert a.std().item() == pytest.approx(1 / 8, rel=0.05) and all(bool((p == 0).all()) for p in b)
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "gaussian"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """run(init, bits): (output folder, batch, trained logits, base bytes) of a 3-step one-rank run,
    trained once per module (a world of one inside the test process, undone afterwards)."""
    from qlora_dist import dist

    runs, shutdown = {}, dist.shutdown
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port())}.items():
            mp.setenv(key, value)
        # One process group for every run: deepspeed 0.19.8 keeps the first in its globals and cannot train
        # in a second after destroy_process_group (as tests/workers/train_cases.for_each_case).
        mp.setattr(dist, "shutdown", lambda: None)

        def run(init: str, bits: int):
            if (init, bits) not in runs:
                out = tmp_path_factory.mktemp(f"{init}{bits}")
                keys = [f"lora.init={init}", f"quantization.bits={bits}"] + (["lora.init_iters=2"] if init == "loftq" else [])
                runs[init, bits] = (out, *_train(out, *keys))
            return runs[init, bits]

        yield run
        shutdown()


def _train(out, *keys):
    """The real Trainer for 3 steps in fp32; (the batch, its logits after training)."""
    from qlora_dist.config import load_config
    from qlora_dist.data.batches import collate
    from qlora_dist.launch.job import prepare
    from qlora_dist.train.trainer import Trainer

    cfg = load_config(overrides=[*TINY, "model.compute_dtype=float32", "train.max_steps=3", "train.save_steps=3",
                                 "optim.lr=1e-2", *keys, f"train.output_dir={out}"])
    trainer = Trainer(cfg, prepare(cfg))
    try:
        trainer.setup()
        trainer.train()
        batch = collate(trainer.rows[:4], trainer.tokenizer.pad_token_id)
        model = trainer.engine.module.eval()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        base = _base_bytes(model)
    finally:
        trainer.cleanup()
    return batch, logits, base


def _base_bytes(model) -> dict[str, bytes]:
    """Every linear layer's stored base weight as bytes (NF4: packed codes and absmax, nested ones too)."""
    import bitsandbytes as bnb

    out = {}
    for name, m in model.named_modules():
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            parts = [m.weight.data, qs.absmax, *([qs.state2.absmax, qs.offset] if qs.nested else [])]
            out[name] = b"".join(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in parts)
        elif isinstance(m, torch.nn.Linear) and "lora_" not in name and not name.endswith("lm_head"):
            out[name] = m.weight.data.contiguous().view(torch.uint8).numpy().tobytes()
    return out


def _logits(model, batch) -> torch.Tensor:
    from qlora_dist import compat

    compat.disable_cpu_weight_repacking(model)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


@pytest.mark.slow  # the real Trainer, 3 runs shared by these tests
@pytest.mark.parametrize("init,bits", [("loftq", 4), ("pissa", 16)])
def test_one_rank_adapter_reloads_on_the_rebuilt_base(trained, init, bits, tiny_model_dir):
    """Trained with the start on one rank; `generate`'s loading (load_for_inference, 2 threads where the
    loader's SVDs pinned 1) rebuilds the same base bytes, and PeftModel.from_pretrained on it gives the
    trained logits; the plain base with the same adapter does not."""
    from qlora_dist.evaluate.generate import load_for_inference
    from qlora_dist.model.base import load_base

    out, batch, want, trained_base = trained(init, bits)
    adapter = out / "adapter_model"
    assert json.loads((adapter / "qlora_dist.json").read_text())["lora_init"] == init
    assert json.loads((adapter / "adapter_config.json").read_text())["init_lora_weights"] is True
    torch.set_num_threads(2)
    model, _ = load_for_inference("tiny-llama", str(adapter), compute_dtype="float32")
    rebuilt = _base_bytes(model)
    assert len(rebuilt) == 14 and rebuilt == trained_base  # every LoRA layer of the 2 decoder layers, bytes
    mask = batch["attention_mask"].bool()
    got = _logits(model, batch)
    plain = _logits(load_base(tiny_model_dir, bits=bits, compute_dtype="float32"), batch)
    diff, off = ((got - want)[mask].abs().max().item(), (plain - want)[mask].abs().max().item())
    print(f"{init}: reloaded adapter vs trained logits {diff:.3g}; plain base without the start {off:.3g}")
    assert diff < 1e-4 and off > 100 * max(diff, 1e-6)


@pytest.mark.slow  # the real Trainer, 3 runs shared by these tests
def test_starting_adapter_brings_its_start_and_a_conflicting_key_is_an_error(trained):
    """train.init_adapter of a LoftQ adapter: lora.init / init_iters are taken from its qlora_dist.json (so
    the base is rebuilt the same way); a lora.init the user set that contradicts it is named."""
    from qlora_dist.config import load_config
    from qlora_dist.model import init_adapter

    adapter = trained("loftq", 4)[0] / "adapter_model"
    adopted = init_adapter.adopt(load_config(overrides=[*TINY, f"train.init_adapter={adapter}"]))
    assert (adopted.lora.init, adopted.lora.init_iters) == ("loftq", 2)
    problems = init_adapter.problems(load_config(overrides=[*TINY, f"train.init_adapter={adapter}", "lora.init=pissa"]))
    assert [p for p in problems if p.startswith("lora.init: you set 'pissa' but the adapter")], problems


@pytest.mark.slow  # the real Trainer, 3 runs shared by these tests
def test_pissa_as_plain_lora_is_exact_on_16_bits_and_measured_on_nf4(trained, tmp_path, tiny_model_dir):
    """convert-pissa (peft's path_initial_model_for_weight_conversion): r doubles; the original 16-bit base
    plus the converted LoRA gives the trained logits to fp32 rounding; on NF4 the difference of the two
    quantization errors remains (printed; README "Adapter variants")."""
    from peft import PeftModel

    from qlora_dist.model.base import load_base
    from qlora_dist.model.pissa_lora import convert

    gaps = {}
    for bits in (16, 4):
        out, batch, want, _ = trained("pissa", bits)
        convert("tiny-llama", out / "adapter_model", tmp_path / f"as_lora{bits}")
        config = json.loads((tmp_path / f"as_lora{bits}" / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (16, 32)  # TINY's r=8, alpha=16, doubled
        model = PeftModel.from_pretrained(load_base(tiny_model_dir, bits=bits, compute_dtype="float32"),
                                          str(tmp_path / f"as_lora{bits}"))
        mask = batch["attention_mask"].bool()
        gaps[bits] = (_logits(model, batch) - want)[mask].abs().max().item() / want[mask].abs().max().item()
    print(f"converted PiSSA vs trained logits, relative to the logits' range: 16-bit {gaps[16]:.3g}, "
          f"NF4 {gaps[4]:.3g}")
    assert gaps[16] < 1e-5 and gaps[4] > 100 * gaps[16]
