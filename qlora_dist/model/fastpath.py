"""Training fast paths: a fused, chunked linear + cross-entropy loss that never holds the full logits,
and a LoRA forward that adds the adapter in the epilogue of one matmul.

The loss.

transformers' LlamaForCausalLM computes `logits = lm_head(hidden)` for every position (bf16), upcasts
them to fp32 and runs cross-entropy; autograd keeps the fp32 log-softmax and the backward makes fp32 and
bf16 gradients of the same size: 12 bytes per vocabulary entry per token at the peak (measured with the
CPU allocator, tests/test_planner_gaps.py; 7B, 32 x 512: 6.3 GB, more than all checkpointed activations). Here the loss walks the labelled tokens in chunks and,
since lm_head is frozen in QLoRA, computes the gradient with respect to the hidden states in the same
pass (softmax - one-hot, times the weight), so that only that gradient (2 bytes per hidden unit per
token) is kept for the backward. Positions whose label is ignored (-100: the source part, padding) never
reach lm_head at all. Numerics follow transformers' path: logits from a matmul in the model's dtype,
softmax in fp32, the logits' gradient rounded to the model's dtype before the matmul with the weight.

`install_fused_loss(model)` gives the model's causal LM (the families of FUSED_LOSS_FAMILIES) its own forward: with labels it returns
the loss (logits None); without labels (generation, evaluation) it is transformers' own forward. The
engine's forward still goes through the root module, so DeepSpeed's hooks (ZeRO-3 gathering) run as
usual; the lm_head weight, partitioned under ZeRO-3, is gathered for the loss explicitly.

The LoRA forward. peft 0.21.2's 4-bit LoRA layer computes `result = base(x).clone()` ("defensively", a
comment there says), then `lora_B(lora_A(dropout(x))) * scaling` and `result + output`: four full passes
over the layer's output (clone, B's product, the scaling, the sum) besides the base matmul, and the
backward of the scaling is one more. `install_fused_lora(model)` gives each LoRA layer a forward that
computes `addmm(base(x), lora_A(dropout(x)), B.T, alpha=scaling)`: the product, the scaling and the sum
happen in one matmul epilogue, out of place (so no clone is needed), rounded once. Same math, same
modules (dropout, lora_A) and the same tensors saved for the backward. It applies to the one-adapter,
plain-LoRA, no-autocast case our trainer runs; anything else (merged or disabled adapters, several
adapters, DoRA and other variants, autocast, ZeRO-3-partitioned LoRA weights) takes peft's forward.

Compiled elementwise kernels (opt-in, `model.compile_kernels`). transformers' eager RMSNorm, rotary
embedding and SwiGLU make one pass over memory per operation (RMSNorm: seven, in fp32); `torch.compile`
fuses each into one kernel, forward and backward. Only these small pure functions are compiled — the
4-bit matmuls, peft and DeepSpeed's hooks stay eager — so there are no graph breaks to chase.
"""
from __future__ import annotations

import contextlib
import types

import torch

IGNORE_INDEX = -100
# Logits computed at once: chunk tokens x vocabulary (2**25 entries = 128 MB in fp32 per chunk; for
# LLaMA's 32,000-token vocabulary 1,048 tokens, a matmul large enough to run at full speed).
CHUNK_ELEMENTS = 2 ** 25


def chunk_tokens(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `labels` (all valid), by chunks of tokens, or
    with `token_weights` (fp32, one per token) the weighted sum. The weight gets no gradient (frozen), so
    the hidden states' gradient is made here, in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, divisor: float, chunk: int, token_weights=None):
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            w = None if token_weights is None else token_weights[start:start + chunk]
            ce = lse - logits.gather(1, y[:, None]).squeeze(1)
            total += ce.sum() if w is None else (ce * w).sum()
            if need_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs.scatter_add_(1, y[:, None], torch.full_like(lse[:, None], -1.0))
                probs.div_(divisor) if w is None else probs.mul_(w[:, None])
                grad[start:start + chunk] = probs.to(weight.dtype) @ weight
                del probs
            del logits
        ctx.save_for_backward(grad)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None, None


def _gathered(weight: torch.nn.Parameter):
    """ZeRO-3 keeps only this rank's slice of a parameter outside its module's forward. Read inside the
    causal LM's forward, deepspeed 0.19.8 gathers lm_head's weight by itself (its ZeROOrderedDict registers
    it as an external parameter of the module running, and releases it after that module's forward) and
    then refuses to free it from a GatheredParameters context ("still active in submodules"): use it as
    it is. Otherwise (called outside a ZeRO-3 forward) gather it, read-only; every rank joins."""
    if not hasattr(weight, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if weight.ds_status == ZeroParamStatus.AVAILABLE:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters([weight])


def _shift(labels: torch.Tensor, weights: torch.Tensor | None,
           shifted: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Labels (and their weights) one position left, flattened: position t predicts label t + 1.
    `shifted`: they already are (a sequence-parallel slice, shifted on the whole row: model/loss.py)."""
    cut = 0 if shifted else 1
    labels = torch.nn.functional.pad(labels, (0, cut), value=IGNORE_INDEX)[..., cut:].reshape(-1)
    if weights is not None:
        weights = torch.nn.functional.pad(weights, (0, cut))[..., cut:].reshape(-1).float()
    return labels, weights


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                           shifted: bool = False) -> torch.Tensor:
    """sum of weight x cross-entropy over the labelled positions, in fp32 as transformers' ForCausalLMLoss;
    `weights` is shaped like `labels` and belongs to the label (not to the position predicting it)."""
    shifted, w = _shift(labels, weights, shifted)
    ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted,
                                           ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * w).sum()


def linear_cross_entropy(hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor,
                         num_items_in_batch: int | torch.Tensor | None = None,
                         loss_weights: torch.Tensor | None = None, shifted: bool = False) -> torch.Tensor:
    """transformers' ForCausalLMLoss(lm_head(hidden), labels) without the full logits: labels shifted
    by one, -100 ignored, mean over the labelled tokens (or sum / num_items_in_batch when given); with
    `loss_weights` (shaped like labels) `weighted_cross_entropy` instead."""
    shifted, weights = _shift(labels, loss_weights, shifted)
    keep = (shifted != IGNORE_INDEX).nonzero().squeeze(1)
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    targets = shifted.index_select(0, keep)
    token_weights = None if weights is None else weights.index_select(0, keep)
    if token_weights is not None:
        divisor = 1.0
    elif num_items_in_batch is not None:
        divisor = float(num_items_in_batch)
    else:
        divisor = float(max(keep.numel(), 1))  # transformers gives NaN when nothing is labelled; we give 0
    with _gathered(lm_head.weight):
        return _LinearCrossEntropy.apply(flat, lm_head.weight, targets, divisor, chunk_tokens(lm_head.out_features),
                                         token_weights)


# Families whose causal LM computes `lm_head(hidden)` and the loss, nothing between (transformers 5.24):
# the fused loss computes exactly that. Gemma-2 caps the logits (tanh(logits / c) * c) before the loss
# when final_logit_softcapping is set, which the chunked loss does not do: it declines there.
FUSED_LOSS_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2")
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def fused_loss_refusal(causal_lm: torch.nn.Module) -> str | None:
    """Why the fused loss does not apply to this model (None: it does)."""
    config = getattr(causal_lm, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FUSED_LOSS_FAMILIES:
        return f"model_type {family!r} is not among the families it was checked on ({', '.join(FUSED_LOSS_FAMILIES)})"
    if transform := next((k for k in LOGIT_TRANSFORMS if getattr(config, k, None) is not None), None):
        return f"{family} transforms its logits before the loss ({transform}={getattr(config, transform)})"
    head = getattr(causal_lm, "lm_head", None)
    if not (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            and hasattr(causal_lm, "model")):
        return "lm_head is not a plain, frozen, bias-free linear layer"
    return None


def supports_fused_loss(causal_lm: torch.nn.Module) -> bool:
    """A plain, frozen, bias-free lm_head (LoRA never targets it) of a checked family whose logits go to the
    loss as they are; anything else keeps transformers' path."""
    return fused_loss_refusal(causal_lm) is None


def install_fused_loss(model: torch.nn.Module) -> bool:
    """Give the (PEFT-wrapped) model's causal LM the fused loss; False (nothing changed) where it does
    not apply. Call after the trainable parameters are chosen (lm_head must be frozen)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(causal_lm, "_qlora_fused_loss"):  # already installed
        return True
    if not supports_fused_loss(causal_lm):
        return False
    hf_forward = causal_lm.forward

    def forward(self, *args, labels=None, logits_to_keep=0, num_items_in_batch=None, loss_weights=None,
                shift_labels=None, **kwargs):
        # shift_labels (transformers' name): labels already shifted on the whole row, a sequence-parallel slice
        shifted, labels = shift_labels is not None, labels if shift_labels is None else shift_labels
        if labels is None or logits_to_keep or not self._qlora_fused_loss:
            if loss_weights is not None:  # model/loss.py passes them only to the fused loss
                raise ValueError("loss_weights needs the fused loss (labels, all logits, fused loss on)")
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            if shifted:
                kwargs["shift_labels"] = labels
            return hf_forward(*args, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("return_dict", None)
        outputs = self.model(*args, **kwargs)
        loss = linear_cross_entropy(outputs.last_hidden_state, self.lm_head, labels, num_items_in_batch,
                                    loss_weights, shifted)
        return CausalLMOutputWithPast(loss=loss, logits=None)  # training: use_cache is off, no cache

    causal_lm.forward = types.MethodType(forward, causal_lm)
    causal_lm._qlora_fused_loss = True  # a switch: False gives transformers' loss (tests compare the two)
    return True


def set_fused_loss(model: torch.nn.Module, enabled: bool) -> None:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(causal_lm, "_qlora_fused_loss"):
        causal_lm._qlora_fused_loss = enabled


# ------------------------------------------------------------------------------------------ LoRA
def _fused_lora_applies(layer, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    if args or kwargs or layer.disable_adapters or layer.merged or torch.is_autocast_enabled():
        return False
    if len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return False
    if getattr(layer, "fan_in_fan_out", False):
        return False
    a, b = layer.lora_A[name], layer.lora_B[name]
    return (a.bias is None and b.bias is None and a.weight.dtype == b.weight.dtype == x.dtype
            and not hasattr(b.weight, "ds_id"))  # ZeRO-3 gathers B only inside its module's call


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if not _fused_lora_applies(self, x, args, kwargs):
        return self._qlora_peft_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    result = self.base_layer(x)
    down = self.lora_A[name](self.lora_dropout[name](x))
    out = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]),
                      self.lora_B[name].weight.t(), alpha=self.scaling[name])
    return out.view(result.shape)


def install_fused_lora(model: torch.nn.Module) -> int:
    """Give every peft LoRA linear layer the fused forward; returns how many layers got it."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit  # not a subclass of lora.Linear

    count = 0
    for module in model.modules():
        if isinstance(module, (LoraLinear, LoraLinear4bit)) and not hasattr(module, "_qlora_peft_forward"):
            module._qlora_peft_forward = module.forward
            module.forward = types.MethodType(_fused_lora_forward, module)
            count += 1
    return count


def uninstall_fused_lora(model: torch.nn.Module) -> None:
    """Back to peft's own forward (tests compare the two)."""
    for module in model.modules():
        if hasattr(module, "_qlora_peft_forward"):
            module.forward = module._qlora_peft_forward
            del module._qlora_peft_forward


# ------------------------------------------------------------------------- compiled elementwise kernels
def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, the same operations."""
    dtype = hidden.dtype
    h = hidden.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary(q, k, cos, sin, unsqueeze_dim: int = 1):
    """transformers' apply_rotary_pos_emb, the same operations."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


_COMPILED: dict[str, object] = {}


def _compiled(fn):
    if fn.__name__ not in _COMPILED:  # dynamic: one graph for every batch and sequence length
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn.__name__]


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _compiled(_rms_norm)(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_compiled(_silu_mul)(self.gate_proj(x), self.up_proj(x)))


def install_compiled_kernels(model: torch.nn.Module) -> int:
    """Compiled RMSNorm and SwiGLU forwards on this model's modules; the rotary embedding for the process:
    transformers 5.24's LlamaAttention.forward calls the module-level apply_rotary_pos_emb, so that name
    is replaced in transformers.models.llama.modeling_llama. Returns how many modules were changed: 0 for
    any other family (their norms, MLPs and rotary functions are their own classes: Gemma's norm scales by
    1 + weight, Phi-3's MLP is fused), which keep transformers' eager forwards."""
    from transformers.models.llama import modeling_llama as llama

    if getattr(getattr(model, "config", None), "model_type", None) != "llama":
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, llama.LlamaRMSNorm):
            module.forward = types.MethodType(_norm_forward, module)
            count += 1
        elif isinstance(module, llama.LlamaMLP) and module.config.hidden_act == "silu" and not module.config.mlp_bias:
            module.forward = types.MethodType(_mlp_forward, module)
            count += 1
    llama.apply_rotary_pos_emb = _compiled(_rotary)
    return count
