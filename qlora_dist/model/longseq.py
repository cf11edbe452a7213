"""Long samples on one GPU: the tiled MLP (`model.tiled_mlp`) with lean norms beside it, and the offload of
checkpointed layer inputs (`model.gradient_checkpointing=offload`).

The tiled MLP. A decoder layer's MLP keeps, per token, its gate, up and activation outputs (3.5x the hidden
size each for Llama-3) and LoRA's inputs for the backward. `TiledMLP` runs the MLP on tiles of about
hidden-size tokens (DeepSpeed's rule, ceil(tokens / hidden) tiles) without grad, keeps only its input, and
in backward recomputes it tile by tile, each tile's LoRA gradients accumulated before the next tile runs.
The MLP works token by token, so the tiles' outputs are the whole MLP's.

Why our own function and not deepspeed 0.19.8's `TiledMLP` (runtime/sequence_parallel/ulysses_sp.py): that
one recomputes each tile in backward with whatever the RNG state is then, so LoRA dropout (the recipe's 0.1)
draws other masks than the forward did and the gradient is not that of the loss computed. Here each tile's
RNG state is recorded in forward and restored for its recompute (as torch.utils.checkpoint does). The
ZeRO protocol is DeepSpeed's: a parameter's gradient is marked not ready (`ds_grad_is_ready`) until the last
tile, so ZeRO-1/2/3 reduce it once; under ZeRO-3 every rank must gather the MLP's weights as many times as
the others, so the tile count is the maximum over the ranks (one all-reduce per layer).
"""
from __future__ import annotations

import contextlib
import math
import types

import torch

# model.tiled_mlp=auto tiles a micro-batch whose rows hold at least this many tokens (per rank): there the
# MLP's saved activations (8 bytes per intermediate unit per token, memory.py) exceed 0.9 GB per layer for
# Llama-3-8B, more than the 1 GB of its checkpointed inputs of all 32 layers at that length, and a second
# MLP forward per step is a small price; below it the MLP runs whole.
AUTO_TILE_TOKENS = 8192


def tile_count(tokens: int, hidden: int) -> int:
    """Tiles of about `hidden` tokens (DeepSpeed's example rule: ceil(seqlen / hidden))."""
    return max(1, math.ceil(tokens / hidden))


def tiles_for(mode: str, tokens: int, hidden: int) -> int:
    """Tiles this rank would use (0: the MLP runs whole) for model.tiled_mlp=`mode` and rows of `tokens`."""
    if mode == "on" or (mode == "auto" and tokens >= AUTO_TILE_TOKENS):
        return tile_count(tokens, hidden)
    return 0


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _replayed_rng(state, device: torch.device):
    """The RNG as it was when `state` was taken, restored afterwards (LoRA dropout's masks drawn again)."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


class TiledMLP(torch.autograd.Function):
    """`mlp_forward(x)` by `tiles` tiles of the sequence (dim -2); `params`: the trainable parameters it uses
    (their gradients accumulate tile by tile in backward)."""

    @staticmethod
    def forward(ctx, mlp_forward, x, tiles: int, params: list):
        ctx.mlp_forward, ctx.tiles, ctx.params = mlp_forward, tiles, params
        ctx.save_for_backward(x)
        ctx.rng = []
        outputs = []
        with torch.no_grad():
            for piece in torch.chunk(x, tiles, dim=-2):
                ctx.rng.append(_rng_state(x.device))
                outputs.append(mlp_forward(piece))
        return torch.cat(outputs, dim=-2)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        x = x.detach()
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[1] else None
        pieces = torch.chunk(x, ctx.tiles, dim=-2)
        start = 0
        for i, piece in enumerate(pieces):
            for p in ctx.params:  # DeepSpeed reduces a gradient once it is ready: after the last tile
                p.ds_grad_is_ready = i == len(pieces) - 1
            width = piece.shape[-2]
            piece = piece.detach().requires_grad_(grad_x is not None)
            with torch.enable_grad(), _replayed_rng(ctx.rng[i], x.device):
                out = ctx.mlp_forward(piece)
            torch.autograd.backward(out, grad_out.narrow(-2, start, width))
            if grad_x is not None:
                grad_x.narrow(-2, start, width).copy_(piece.grad)
            start += width
        return None, grad_x, None, None


# The decoder layers' norms that compute transformers' LlamaRMSNorm exactly (Gemma's scale by 1 + weight and
# keep their autograd norms): LeanRMSNorm may stand in for them.
LEAN_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"})


class LeanRMSNorm(torch.autograd.Function):
    """LlamaRMSNorm (fp32 statistics, the normalized state cast back, times the weight) by `tiles` tiles of
    tokens, keeping the input and each token's fp32 reciprocal RMS alone for the backward, which computes
    the closed form r·(g − x̂·mean(g·x̂)) tile by tile. Autograd's norm keeps an fp32 copy of its input and its
    backward holds five fp32 copies of the hidden state at once (22 bytes per hidden unit per token with the
    bf16 gradient, measured at bench/long_seq.py's 8k tiled peak): once the MLP is tiled, that is the widest
    transient of a layer's backward. Run inside the norm module's call, so ZeRO-3's hooks gather its weight
    for the forward and again for the backward as for any module."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, tiles: int):
        out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        rstd = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
        for xs, outs, rs in zip(*(t.flatten(0, -2).tensor_split(tiles) for t in (x, out, rstd))):
            xf = xs.float()
            rs.copy_(torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))
            outs.copy_(weight * (xf * rs).to(x.dtype))
        ctx.tiles = tiles
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous: its tiles are views
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[1] else None
        split = [t.flatten(0, -2).tensor_split(ctx.tiles) for t in (x, rstd, grad_out.contiguous(), grad_x)]
        for xs, rs, gs, grad_xs in zip(*split):
            normed = xs.float() * rs
            if grad_w is not None:  # summed in fp32 (autograd sums in the weight's dtype)
                grad_w += (gs * normed.to(x.dtype)).float().sum(0)
            g = (gs * weight).to(x.dtype).float()
            grad_xs.copy_(rs * (g - normed * (g * normed).mean(-1, keepdim=True)))
        return grad_x, None if grad_w is None else grad_w.to(weight.dtype), None, None


def _lean_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    tiles = tiles_for(self._qlora_tiled_mode, x.shape[-2], x.shape[-1])
    # the MLP's rule for this rank's rows (no collective: the norm gathers its weight once either way)
    if not (torch.is_grad_enabled() and tiles):
        return self._qlora_norm_forward(x)
    return LeanRMSNorm.apply(x, self.weight, self.variance_epsilon, tiles)


def _agreed_tiles(mlp: torch.nn.Module, tiles: int) -> int:
    """The maximum of `tiles` over the ranks when ZeRO-3 partitions this MLP (every rank must gather its
    weights equally often, or the gathers hang); `tiles` as it is otherwise."""
    partitioned = any(hasattr(p, "ds_id") for p in mlp.parameters())
    if not (partitioned and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tiles
    count = torch.tensor([tiles], dtype=torch.long, device=next(mlp.parameters()).device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count.item())


def _tiled_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():  # nothing kept for a backward: nothing to save (every rank alike)
        return self._qlora_mlp_forward(x)
    tiles = _agreed_tiles(self, tiles_for(self._qlora_tiled_mode, x.shape[-2], x.shape[-1]))
    if tiles == 0:
        return self._qlora_mlp_forward(x)
    params = [p for p in self.parameters() if p.requires_grad]
    return TiledMLP.apply(self._qlora_mlp_forward, x, tiles, params)


def install_tiled_mlp(model: torch.nn.Module, mode: str) -> int:
    """Give every decoder layer's MLP (the `mlp` of each layer: LLaMA, Mistral, Qwen, Gemma-2, Phi-3) the
    tiled forward for model.tiled_mlp=`mode` (auto, on), and its LLaMA-style norms (LEAN_NORMS) LeanRMSNorm
    where the MLP tiles; returns how many MLPs got it (0 for off)."""
    if mode == "off":
        return 0
    count = 0
    for name, module in model.named_modules():
        mlp = getattr(module, "mlp", None)
        if name.rsplit(".", 1)[-1].isdigit() and isinstance(mlp, torch.nn.Module) and not hasattr(mlp, "_qlora_mlp_forward"):
            _wrap_forward(mlp, "_qlora_mlp_forward", _tiled_forward, mode)
            count += 1
            for norm in module.children():
                if type(norm).__name__ in LEAN_NORMS and not hasattr(norm, "_qlora_norm_forward"):
                    _wrap_forward(norm, "_qlora_norm_forward", _lean_norm_forward, mode)
    return count


def _wrap_forward(module: torch.nn.Module, kept: str, forward, mode: str) -> None:
    """`forward` in place of the module's forward, which it finds as `kept` (the forward in place: peft's,
    transformers', or compiled kernels'), with model.tiled_mlp's mode (set_tiled_mlp switches it)."""
    setattr(module, kept, module.forward)
    module._qlora_tiled_mode = mode
    module.forward = types.MethodType(forward, module)


def set_tiled_mlp(model: torch.nn.Module, mode: str) -> None:
    """Switch an installed tiled MLP's mode (tests compare off and on on the same model)."""
    for module in model.modules():
        if hasattr(module, "_qlora_tiled_mode"):
            module._qlora_tiled_mode = mode


def checkpoint_offload(gradient_checkpointing) -> contextlib.AbstractContextManager:
    """What a training micro-step (forward and backward) runs inside: for model.gradient_checkpointing=offload
    one offloading context for the run (compat.checkpoint_offload: DeepSpeed's, reused so its pinned buffers
    are too), else nothing."""
    from qlora_dist import compat

    return compat.checkpoint_offload() if gradient_checkpointing == "offload" else contextlib.nullcontext()
