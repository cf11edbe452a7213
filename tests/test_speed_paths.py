"""The fast paths (qlora_dist/fastpath.py) compute what transformers and peft compute.

Tolerances: in fp32 the paths agree to float rounding (loss 1e-5 absolute, gradients 1e-5 relative). In
bf16 they round differently — the fused LoRA rounds its product, scaling and sum once where peft rounds
each — so they agree to bf16's precision: loss within 2e-3, LoRA gradients within 2e-2 relative (the
norm of the difference over the norm; bf16 keeps 8 significant bits, 3.9e-3 relative per rounding).
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, run_torchrun
from qlora_dist.model import fastpath


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).norm()) ** 2 for x, y in zip(a, b)) ** 0.5
    return num / sum(float(y.norm()) ** 2 for y in b) ** 0.5


def test_linear_cross_entropy_equals_torch(monkeypatch):
    monkeypatch.setattr(fastpath, "CHUNK_ELEMENTS", 7 * 50)  # 7 tokens a chunk: several chunks, one ragged
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).double().requires_grad_(False)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = -100
    labels[2, 7:] = -100
    expected = torch.nn.functional.cross_entropy(head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    got = fastpath.linear_cross_entropy(hidden, head, labels)
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-6)
    (want_grad,) = torch.autograd.grad(expected * 3, hidden)
    (got_grad,) = torch.autograd.grad(got * 3, hidden)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-9)
    # sum / num_items_in_batch, as transformers does when it is given; nothing labelled gives 0, not NaN
    summed = fastpath.linear_cross_entropy(hidden, head, labels, num_items_in_batch=100)
    torch.testing.assert_close(summed, (expected * (labels[:, 1:] != -100).sum() / 100).float())
    nothing = fastpath.linear_cross_entropy(hidden, head, torch.full_like(labels, -100))
    assert nothing.item() == 0.0


def _loss_and_grads(model, batch, seed=1):
    lora = [p for p in model.parameters() if p.requires_grad]
    for p in lora:
        p.grad = None
    torch.manual_seed(seed)  # the same dropout masks on every path
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), [p.grad.float().clone() for p in lora]


@pytest.mark.parametrize("dtype,loss_tol,grad_tol", [("float32", 1e-5, 1e-5), ("bfloat16", 2e-3, 2e-2)])
def test_fast_paths_match_transformers_and_peft(tiny_model_dir, dtype, loss_tol, grad_tol):
    from qlora_dist import compat
    from qlora_dist.config import load_config
    from qlora_dist.model.base import build_model

    compat.quiet_known_warnings()
    cfg = load_config(overrides=["model.path=tiny-llama", "lora.r=8", "lora.dropout=0.1",
                                 f"model.compute_dtype={dtype}"])
    model = build_model(cfg)
    model.train()
    torch.manual_seed(5)
    for name, p in model.named_parameters():  # B starts at zero: give the adapters something to add
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=gen)
    labels = ids.clone()
    labels[:, :10] = -100  # a masked source, as the trainer's rows have
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0  # and a padded row
    labels[2, 30:] = -100
    packed = {"input_ids": ids, "position_ids": torch.arange(40).remainder(17).expand(3, 40), "labels": labels}
    for batch in ({"input_ids": ids, "attention_mask": mask, "labels": labels}, packed):
        fast = _loss_and_grads(model, batch)
        fastpath.set_fused_loss(model, False)
        fastpath.uninstall_fused_lora(model)
        slow = _loss_and_grads(model, batch)
        fastpath.set_fused_loss(model, True)
        assert fastpath.install_fused_lora(model) == 7 * model.config.num_hidden_layers
        assert abs(fast[0] - slow[0]) <= loss_tol, (fast[0], slow[0])
        assert _relative(fast[1], slow[1]) <= grad_tol
    with torch.no_grad():  # without labels: transformers' own forward, logits for generation
        assert model(input_ids=ids).logits.shape == (3, 40, model.config.vocab_size)


def test_compiled_kernels_compute_what_transformers_computes():
    """The functions model.compile_kernels compiles are transformers' operations, checked eagerly here (a
    compile on 2 CPU cores takes ~30 s; compiled, the tiny model's fp32 gradients matched to 1.2e-8 once)."""
    from transformers.models.llama import modeling_llama as llama

    torch.manual_seed(0)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    norm = llama.LlamaRMSNorm(32, eps=1e-6).to(torch.bfloat16)
    norm.weight.data.normal_(1, 0.1)
    assert torch.equal(fastpath._rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))
    gate, up = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    assert torch.equal(fastpath._silu_mul(gate, up), torch.nn.functional.silu(gate) * up)
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    for got, want in zip(fastpath._rotary(q, k, cos, sin), llama.apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(got, want)


def test_planner_counts_the_fused_loss():
    from qlora_dist import memory

    setup = memory.Setup(shape=memory.Shape.llama("7b"), micro_batch=32, seq_len=512, checkpointing=False)
    hf = memory.make_plan(memory.Setup(**{**setup.__dict__, "fused_loss": False}))
    fused = memory.make_plan(setup)
    # transformers' logits at 32 x 512 with LLaMA's vocabulary: 12 bytes x 32,000 x 16,384 = 6.3 GB at the
    # loss (tests/test_planner_gaps.py measures the 12); fused: one 1,048-token chunk (0.27 GB), the labelled
    # hidden states and their gradient, and the final norm's fp32 copy and output (10 bytes a hidden unit: 0.67 GB)
    assert memory.logits_bytes(hf.setup) == 12 * 32000 * 16384
    assert memory.logits_bytes(setup) == 8 * 32000 * 1048 + 10 * 4096 * 16384
    # (the loss phase comes before the first LoRA gradient allocates ZeRO-2's reduce bucket: it shares its room)
    bucket = memory.zero2_bucket_bytes(setup)
    assert hf.total - fused.total == 12 * 32000 * 16384 - bucket - memory.activation_items(setup)["activations_peak_phase"]
    # with checkpointing the recomputed layer's backward (5.8 GB here) is the fused loss's peak phase, and
    # transformers' loss (6.3 GB) is larger still
    ckpt = memory.Setup(**{**setup.__dict__, "checkpointing": True})
    unfused = memory.Setup(**{**ckpt.__dict__, "fused_loss": False})
    recomputed = memory.activation_items(ckpt)["activations_peak_phase"]
    assert memory.make_plan(unfused).total - memory.make_plan(ckpt).total == 12 * 32000 * 16384 - bucket - recomputed


@pytest.mark.slow
def test_fast_paths_under_zero3_two_ranks(tmp_path):
    run_torchrun(2, str(tmp_path), "model.path=tiny-llama", "lora.r=8", "lora.dropout=0.0",
                 script=str(REPO / "tests" / "workers" / "fast_paths_zero3.py"), timeout=300)
    rows = json.loads((tmp_path / "fast_paths_zero3.json").read_text())
    assert len(rows) == 2
    for row in rows:
        (fast_loss, fast_grads), (slow_loss, slow_grads) = row["fast"], row["slow"]
        assert abs(fast_loss - slow_loss) <= 2e-3, (fast_loss, slow_loss)
        assert _relative([torch.tensor(g) for g in fast_grads], [torch.tensor(g) for g in slow_grads]) <= 2e-2
        assert all(loss == loss for loss in row["train_losses"])  # trains (no NaN) with lm_head partitioned
