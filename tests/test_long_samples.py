"""Long samples on one GPU (issue 28): the tiled MLP and the offloaded checkpoint inputs compute what the
plain path computes, no sequence x sequence tensor on the long-sample path, Llama-3 shapes, and the
planner's options and longest sample."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY, run_cli
from qlora_dist import compat, memory
from qlora_dist.config import load_config
from qlora_dist.data.batches import TokenizedExample, collate
from qlora_dist.model import longseq
from qlora_dist.model.loss import StepObjective, weighted_loss

# fp32 sums of the same products in another grouping (tiles, chunks): this far apart at most, relative
TOLERANCE = 1e-5


LAYERS = 3


@pytest.fixture(scope="module")
def tiny():
    """The tiny LLaMA (3 layers) as the trainer builds it (NF4 base, LoRA on every linear layer, the tiled
    MLP installed), fp32 compute, with LoRA's B made non-zero (it starts at zero, which would leave A's
    gradient zero too). One model for the module: `_configure` sets what each test needs."""
    from qlora_dist.model.base import add_lora, prepare_for_training
    from qlora_dist.model.builtin import tiny_llama_config
    from qlora_dist.model.loader import RandomSource, load_layerwise

    cfg = load_config(overrides=["lora.r=8", "lora.dropout=0.1", "model.compute_dtype=float32", "model.tiled_mlp=on"])
    config = tiny_llama_config(512)
    config.num_hidden_layers = LAYERS
    model = add_lora(load_layerwise(config, RandomSource(), compute_dtype="float32"), cfg, 0)
    prepare_for_training(model, cfg)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.train()
    return model


def _configure(model, dropout: float, checkpointing: bool, tiled: str):
    """LoRA dropout's rate, activation checkpointing on every layer (transformers' per-layer flag) and
    model.tiled_mlp, on the shared model."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
        if hasattr(module, "_gradient_checkpointing_func"):
            module.gradient_checkpointing = checkpointing
    longseq.set_tiled_mlp(model, tiled)
    return model


def _batch(lengths: list[int], seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Rows of random ids of these lengths, collated as the trainer does, and their loss weights."""
    g = torch.Generator().manual_seed(seed)
    rows = [TokenizedExample(torch.randint(4, 512, (n,), generator=g).tolist(),
                             torch.randint(4, 512, (n,), generator=g).tolist()) for n in lengths]
    batch = collate(rows, pad_id=3)
    return batch, StepObjective.of("token", batch).weights(batch)


def _loss_and_grads(model, batch, weights, seed: int = 7, context=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # LoRA dropout's masks
    with context or torch.enable_grad():
        loss = weighted_loss(model, model, batch, weights)
        loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@contextlib.contextmanager
def _tile_counts(function, position: int):
    """The tiles argument (at `position` after ctx) of each forward of an autograd function run inside."""
    calls, original = [], function.forward
    function.forward = staticmethod(lambda ctx, *args: calls.append(args[position]) or original(ctx, *args))
    try:
        yield calls
    finally:
        function.forward = staticmethod(original)


def _assert_close(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(loss_a - loss_b) <= TOLERANCE * abs(loss_b), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * LAYERS  # A and B of 7 linears a layer
    for name in grads_b:
        scale = grads_b[name].abs().max().item()
        assert scale > 0, name
        assert (grads_a[name] - grads_b[name]).abs().max().item() <= TOLERANCE * scale, name


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_equals_the_whole_mlp(tiny, checkpointing):
    """300 tokens in 5 tiles of 64 (the tiny model's hidden size), LoRA dropout off: the same loss and LoRA
    gradients as the MLP run whole, with and without checkpointing (the tiles are recomputed inside the
    layer's recomputation then)."""
    model = _configure(tiny, 0.0, checkpointing, "on")
    batch, weights = _batch([300])
    with _tile_counts(longseq.TiledMLP, 2) as calls:  # (mlp_forward, x, tiles, params)
        tiled = _loss_and_grads(model, batch, weights)
    assert set(calls) == {5} and len(calls) == LAYERS * (2 if checkpointing else 1)  # + the recomputation
    longseq.set_tiled_mlp(model, "off")
    _assert_close(tiled, _loss_and_grads(model, batch, weights))


def test_tiled_mlp_replays_lora_dropout_masks_in_backward(tiny):
    """One tile draws LoRA dropout's masks in the whole MLP's order, so with dropout 0.1 loss and gradients
    equal the whole MLP's only if the backward's recomputation draws the same masks again."""
    model = _configure(tiny, 0.1, False, "on")
    batch, weights = _batch([60])  # <= 64 tokens: one tile
    tiled = _loss_and_grads(model, batch, weights)
    longseq.set_tiled_mlp(model, "off")
    _assert_close(tiled, _loss_and_grads(model, batch, weights))


@pytest.mark.parametrize("dtype,weight_grad", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_lean_rms_norm_is_llamas_norm(dtype, weight_grad):
    """LeanRMSNorm by 5 tiles against transformers' LlamaRMSNorm: the same output bit for bit; the input's
    gradient within fp32 rounding (the closed form against autograd's chain), one bf16 step of its largest
    value in bf16; the weight's (full fine-tuning trains it) summed in fp32, within a bf16 step."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    norm.weight.data.normal_(1, 0.2)
    norm.weight.requires_grad_(weight_grad)
    x, grad = torch.randn(2, 300, 96, dtype=dtype) * 3, torch.randn(2, 300, 96, dtype=dtype)
    runs = []
    for forward in (norm.forward, lambda t: longseq.LeanRMSNorm.apply(t, norm.weight, 1e-5, 5)):
        norm.weight.grad = None
        x_in = x.clone().requires_grad_()
        out = forward(x_in)
        out.backward(grad)
        runs.append((out, x_in.grad, norm.weight.grad))
    (out_a, gx_a, gw_a), (out_b, gx_b, gw_b) = runs
    assert torch.equal(out_a, out_b)
    step = (1e-6 if dtype == torch.float32 else 2 ** -7) * gx_a.abs().max().item()
    assert (gx_a.float() - gx_b.float()).abs().max().item() <= step
    if weight_grad:
        assert (gw_a.float() - gw_b.float()).abs().max().item() <= 2 ** -7 * gw_a.abs().max().item()
    else:
        assert gw_a is None and gw_b is None


def test_lean_norms_stand_in_where_the_mlp_tiles(tiny):
    """install_tiled_mlp gives each decoder layer's two LLaMA norms LeanRMSNorm, used where the MLP tiles
    (model.tiled_mlp=on here; auto from 8,192 tokens): the final norm and a Gemma norm keep autograd's."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    norms = [m for m in tiny.modules() if hasattr(m, "_qlora_norm_forward")]
    assert len(norms) == 2 * LAYERS and all(type(m).__name__ == "LlamaRMSNorm" for m in norms)
    _configure(tiny, 0.0, False, "on")
    with _tile_counts(longseq.LeanRMSNorm, 3) as calls:  # (x, weight, eps, tiles)
        _loss_and_grads(tiny, *_batch([300]))
        longseq.set_tiled_mlp(tiny, "auto")  # 300 tokens: no tiles, autograd's norms
        _loss_and_grads(tiny, *_batch([300]))
    assert calls == [5] * (2 * LAYERS)
    layer = torch.nn.Module()  # a Gemma decoder layer's parts: its norm scales by 1 + weight
    layer.mlp, layer.input_layernorm = torch.nn.Linear(4, 4), GemmaRMSNorm(4)
    assert longseq.install_tiled_mlp(torch.nn.ModuleList([layer]), "on") == 1
    assert hasattr(layer.mlp, "_qlora_mlp_forward") and not hasattr(layer.input_layernorm, "_qlora_norm_forward")


def test_auto_tiles_only_long_rows():
    assert longseq.tiles_for("auto", 8191, 4096) == 0 and longseq.tiles_for("auto", 8192, 4096) == 2
    assert longseq.tiles_for("on", 100, 4096) == 1 and longseq.tiles_for("off", 10**6, 4096) == 0
    assert longseq.tiles_for("auto", 131072, 4096) == 32  # DeepSpeed's rule: ceil(tokens / hidden)


def test_offload_hook_runs_on_cpu_and_moves_nothing(tiny):
    """model.gradient_checkpointing=offload on a CPU: DeepSpeed's hook sees each layer's checkpointed input
    (marked: one a layer) and skips it (its cpu accelerator is a synchronized device); loss and gradients are
    plain checkpointing's, bit for bit."""
    model = _configure(tiny, 0.1, True, "off")
    batch, weights = _batch([40, 33])
    offload = longseq.checkpoint_offload("offload")
    with_hook = _loss_and_grads(model, batch, weights, context=offload)
    stats = offload.stats
    assert (stats.marked_tensors, stats.skipped_marked_tensors, stats.offloaded_tensors) == (3, 3, 0)
    plain = _loss_and_grads(model, batch, weights)
    assert with_hook[0] == plain[0] and all(torch.equal(with_hook[1][k], plain[1][k]) for k in plain[1])


def test_offloaded_inputs_come_back_once_and_are_not_kept(tiny):
    """The copy path itself, on a CPU: a subclass that does not skip host tensors copies each checkpointed
    input but the last into a host buffer and restores it for the recomputation. Gradients equal plain
    checkpointing's, and after the backward no restored input is held (compat.checkpoint_offload: DeepSpeed
    0.19.8 would keep all of them until the context exits)."""
    model = _configure(tiny, 0.0, True, "off")
    batch, weights = _batch([48])
    offload = compat.checkpoint_offload()
    offload._should_skip = lambda tensor: tensor.numel() * tensor.element_size() < offload.min_offload_bytes
    held = []  # restored inputs the context holds after each restore
    restore = offload._restore_tensor
    offload._restore_tensor = lambda tid, cache=True: (restore(tid, cache), held.append(len(offload._restored)))[0]
    moved = _loss_and_grads(model, batch, weights, context=offload)
    stats = offload.stats
    assert (stats.marked_tensors, stats.offloaded_tensors, stats.restored_tensors, stats.kept_last_tensors) == (3, 2, 2, 1)
    assert stats.offloaded_bytes == 2 * 48 * 64 * 4  # two layer inputs of 48 tokens x 64 hidden, fp32
    assert held == [0, 0, 0]  # the last layer's input (kept on the device) included
    _assert_close(moved, _loss_and_grads(model, batch, weights))


class LargestTensor(TorchDispatchMode):
    """The largest tensor any operation produced (elements), and how many reached `limit` elements."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.largest, self.over = limit, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.numel() >= self.limit:
                    self.over.append((str(func), tuple(t.shape), t.dtype))
        return out


def test_no_sequence_squared_tensor_in_a_16k_training_step(tiny):
    """L = 16,384 tokens, a micro batch of one unpadded row (collated as the trainer does), checkpointing and
    LoRA dropout on: no operation of the forward or backward makes a tensor of L^2 elements or more; the
    largest is the loss's chunk of logits (16,384 x 512). The planner counts no mask for it. (The MLP runs
    whole: the tiny model's 64-token tiles would only make its tensors smaller, and 256 of them cost minutes.)"""
    length = 16384
    model = _configure(tiny, 0.1, True, "off")
    batch, weights = _batch([length])
    seen = LargestTensor(length * length)
    with seen:
        _loss_and_grads(model, batch, weights)
    assert seen.over == [] and seen.largest <= length * 512
    setup = memory.Setup(shape=memory.Shape(64, 128, 2, 4, 2, 512), micro_batch=1, seq_len=length)
    assert memory.attention_mask_bytes(setup) == 0


def test_padded_rows_build_the_mask_the_planner_counts(tiny):
    """Two rows of 2,048 and 2,000 tokens: transformers builds a bool [2, 1, L, L] mask (and CPU sdpa an
    additive copy per call), and the planner counts 3 bytes per entry for it."""
    length = 2048
    model = _configure(tiny, 0.0, False, "off")
    batch, weights = _batch([length, length - 48])
    seen = LargestTensor(length * length)
    with seen:
        _loss_and_grads(model, batch, weights)
    masks = [shape for _, shape, dtype in seen.over if dtype == torch.bool]
    assert (2, 1, length, length) in masks
    setup = memory.Setup(shape=memory.Shape(64, 128, 2, 4, 2, 512), micro_batch=2, seq_len=length)
    assert memory.attention_mask_bytes(setup) == 3 * 2 * length * length
    plan = memory.make_plan(setup)
    assert plan.items["attention_mask (sequence x sequence)"] == 3 * 2 * length * length


def test_llama3_shapes_live_with_the_others_and_plan_from_their_config():
    from qlora_dist.model.builtin import random_llama_config

    for size, (inter, layers) in {"llama3-8b": (14336, 32), "llama3-70b": (28672, 80)}.items():
        c = random_llama_config(size)
        assert (c.intermediate_size, c.num_hidden_layers, c.num_key_value_heads, c.vocab_size) == (inter, layers, 8, 128256)
        assert c.rope_parameters["rope_theta"] == 500000.0 and not c.tie_word_embeddings
        cfg = load_config(overrides=[f"model.path=random:{size}"])
        assert memory.shape_for(cfg) == memory.Shape.llama(size)
    assert round(memory.Shape.llama("llama3-8b").parameters() / 1e6) == 8030  # Llama-3.1-8B: 8.03 B
    assert round(memory.Shape.llama("llama3-70b").parameters() / 1e6) == 70554  # Llama-3.1-70B: 70.55 B
    assert memory.size_class(memory.Shape.llama("llama3-8b").parameters()) == "7b"  # paper sizes only


def test_tiled_mlp_planned_as_autograd_keeps_it():
    """What one layer keeps per token with the MLP tiled (one tile here) and LeanRMSNorm for its norms, against
    autograd's saved tensors (tests/test_memory.py's measurement): memory.tiled_layer_bytes_per_token."""
    from test_memory import _llama_config, saved_bytes_per_token_per_layer

    shape = memory.Shape(384, 1024, 1, 6, 2, 1000)
    setup = memory.Setup(shape=shape, lora_dropout=True)  # the recipe's dropout (off: fitted the same way)
    planned = memory.tiled_layer_bytes_per_token(setup)
    measured = saved_bytes_per_token_per_layer(_llama_config(shape), shape.vocab, 0.1, overrides=("model.tiled_mlp=on",))
    assert abs(planned - measured) <= 0.02 * measured, (planned, measured)


def test_planner_options_move_and_shrink_the_right_items():
    s = memory.Setup(shape=memory.Shape.llama("llama3-8b"), micro_batch=1, seq_len=131072, tiled_mlp="off")
    plain = memory.make_plan(s)
    offloaded = memory.make_plan(memory.replace(s, offload=True))
    tiled = memory.make_plan(memory.replace(s, tiled_mlp="on"))
    inputs = 2 * 4096 * 131072
    assert plain.items["activations_checkpointed"] == 32 * inputs
    assert offloaded.items["activations_checkpointed"] == 3 * inputs
    assert offloaded.outside["activations_offloaded (host, pinned)"] == 31 * inputs
    assert tiled.items["activations_peak_phase"] < plain.items["activations_peak_phase"]
    saved = plain.items["activations_peak_phase"] - tiled.items["activations_peak_phase"]
    mlp = memory.mlp_saved_bytes_per_token(s) + 4 * 14336  # kept + the backward's widest gradients, per token
    norms = 4 * 4096  # LeanRMSNorm keeps the norms' bf16 inputs, not their fp32 copies
    assert saved == mlp * (131072 - 131072 // 32) + norms * 131072  # the MLP's all but one tile of 4,096 tokens
    assert memory.tiled_layer_bytes_per_token(s) == memory.layer_activation_bytes_per_token(s) - mlp + 4 * 14336 - norms
    # Gemma's norms (1 + weight) keep autograd's: its backward, 22 bytes per hidden unit per token, may be the widest
    gemma = memory.replace(s, shape=memory.replace(s.shape, lean_norms=False), tiled_mlp="on")
    assert memory.make_plan(gemma).items["activations_peak_phase"] > tiled.items["activations_peak_phase"] + 22 * 4096 * 131072 // 2


def test_longest_sample_names_what_binds():
    s = memory.Setup(shape=memory.Shape.llama("llama3-8b"), offload=True, tiled_mlp="on", lora_dropout=False)
    roomy = memory.longest_sample(s, 80 * 10**9, 512 * 10**9)
    tight = memory.longest_sample(s, 80 * 10**9, 128 * 10**9)
    assert roomy["binding"] == "gpu" and roomy["max_seq_len"] == roomy["gpu_limit"] > 500_000
    assert tight["binding"] == "host" and tight["max_seq_len"] == tight["host_limit"] < roomy["max_seq_len"]
    at = roomy["max_seq_len"]
    assert memory.make_plan(memory.replace(s, seq_len=at)).total <= 80e9 < memory.make_plan(memory.replace(s, seq_len=at + 1)).total


def test_plan_names_the_settings_that_reach_further():
    """70B on one 80 GB GPU with 512 GB of host memory: checkpointing alone holds ~18k tokens; each setting
    not yet used is listed with its own figure, and all of them together pass the issue's 120k goal."""
    s = memory.Setup(shape=memory.Shape.llama("llama3-70b"))
    base = memory.longest_sample(s, 80 * 10**9, 512 * 10**9)["max_seq_len"]
    further = {f["change"]: f["max_seq_len"] for f in memory.longer_sample_changes(s, 80 * 10**9, 512 * 10**9)}
    assert set(further) == {"model.gradient_checkpointing=offload", "lora.dropout=0", "dist.ds_config=zero2_offload",
                            "model.gradient_checkpointing=offload lora.dropout=0 dist.ds_config=zero2_offload"}
    assert all(n > base for n in further.values())
    assert further["model.gradient_checkpointing=offload lora.dropout=0 dist.ds_config=zero2_offload"] >= 120_000
    done = memory.replace(s, offload=True, lora_dropout=False, zero_stage=2, offload_optimizer=True)
    assert memory.longer_sample_changes(done, 80 * 10**9, 512 * 10**9) == []  # nothing left to offer


def _cli(capsys, *args: str) -> str:
    from qlora_dist import cli

    cli.main(list(args))
    return capsys.readouterr().out


def test_plan_max_seq_command(capsys):
    data = json.loads(_cli(capsys, "plan", "--shape", "llama3-8b", "--gpu-memory", "80GB", "--host-memory", "512GB",
                           "--max-seq", "model.gradient_checkpointing=offload", "model.tiled_mlp=on", "--json"))
    assert data["binding"] in ("gpu", "host") and data["max_seq_len"] == min(data["gpu_limit"], data["host_limit"])
    assert data["plan_at_max_seq_len"]["setup"]["seq_len"] == data["max_seq_len"]
    text = _cli(capsys, "plan", "--shape", "llama3-8b", "--gpu-memory", "80GB", "--max-seq")
    assert "longest sample (checkpointing on, tiled MLP auto, micro batch 1)" in text
    assert "binding: the GPU memory" in text and "further with model.gradient_checkpointing=offload:" in text
    bad = run_cli("plan", "--shape", "llama3-8b", "--max-seq", "--host-memory", "lots", check=False)
    assert bad.returncode == 2 and "--host-memory: not a memory size" in bad.stderr
    assert "--max-seq: needs --gpu-memory" in bad.stderr


def test_config_keys_and_the_mask_warning(tmp_path):
    from qlora_dist import preflight

    cfg = load_config(overrides=["model.gradient_checkpointing=offload", "model.tiled_mlp=off"])
    assert cfg.model.gradient_checkpointing == "offload" and cfg.model.tiled_mlp == "off"
    with pytest.raises(Exception, match="override 'model.gradient_checkpointing=sometimes': model.gradient_checkpointing: expected true, false or offload"):
        load_config(overrides=["model.gradient_checkpointing=sometimes"])

    def warnings(micro: int) -> list[str]:
        cfg = load_config(overrides=[*TINY, f"train.micro_batch_size={micro}", "data.source_max_len=8192",
                                     "data.target_max_len=1024", f"train.output_dir={tmp_path / 'out'}"])
        report = preflight.run(cfg, 1, cuda=False, for_train=False)
        assert not report.problems
        return [w for w in report.warnings if "attention mask" in w]

    (padded,) = warnings(2)
    assert padded.startswith("rows of up to 9,216 tokens in micro-batches of 2 padded rows")
    assert f"({3 * 2 * 9216 ** 2 / 1e9:.2f} GB in the memory plan" in padded
    assert warnings(1) == []
