"""The memory planner: what one rank holds, item by item, before anything is loaded.

Weights, LoRA weights, gradients and optimizer states are counted exactly as our trainer lays them out
(packed NF4 in the model dtype, ZeRO partitions with DeepSpeed's padding, fp32 masters and gradients);
tests compare them with the real tensors. Activations follow a per-token model of what autograd saves
for one decoder layer, fitted on the real modules (NF4 linear + LoRA, SDPA, RMSNorm, SwiGLU) with
`torch.autograd.graph.saved_tensors_hooks`, plus the logits and loss buffers and the transients of the
backward pass; the GPU check (bench/gpu_memory.py) compares the total with the allocator's peak.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

GB = 1e9
NF4_BLOCK = 64  # bitsandbytes' default 4-bit blocksize
NESTED_BLOCK = 256  # blocksize of the double quantization of the absmax constants
DS_BUCKET = 50_000_000  # ds_configs/*.json reduce_bucket_size (elements)
DS_MAX_LIVE = 1_000_000_000  # ds_configs/zero3*.json stage3_max_live_parameters (elements)
CUDA_OVERHEAD = 0.25 * GB  # workspace (cuBLAS, NCCL) and allocator rounding, beside the items


# What a model_type's decoder layer holds beyond LLaMA's (transformers 5.24 modeling files): norms per layer,
# q/k norms of head_dim each, biases of the attention projections, fused projections.
_FAMILY_LAYOUT = {
    "qwen2": {"bias": "qkv"},
    "qwen3": {"qk_norm": True},
    "gemma2": {"norms": 4, "attention": "eager", "lean_norms": False},  # no sdpa with soft-capping
    "gemma": {"lean_norms": False},  # Gemma's norms scale by 1 + weight
    "phi3": {"fused": True},
}
# The config flags that give a family's projections biases, and which (Shape.bias letters). Only these
# modeling files read them: the same key in another family's config.json changes none of its modules.
_BIAS_FLAGS = {
    "llama": {"attention_bias": "qkvo", "mlp_bias": "gud"},
    "qwen3": {"attention_bias": "qkvo"},
    "gemma2": {"attention_bias": "qkvo"},
}
_BIAS_ORDER = "qkvogud"  # q, k, v, o, gate, up, down


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None  # None: hidden / heads (Qwen3, Gemma set their own)
    bias: str = ""  # projections with a bias, a letter each of _BIAS_ORDER: "qkv" (Qwen2), "qkvo" (attention_bias),
    # "gud" (LLaMA's mlp_bias)
    norms: int = 2  # RMSNorm weights (hidden each) per layer: 2, Gemma-2's 4
    qk_norm: bool = False  # Qwen3: RMSNorm of head_dim on queries and keys, per layer
    fused: bool = False  # Phi-3: one qkv_proj and one gate_up_proj
    attention: str = "sdpa"  # "eager": Gemma-2 (keeps the attention probabilities)
    lean_norms: bool = True  # LLaMA's RMSNorm, which model/longseq.py's LeanRMSNorm computes where the MLP tiles
    # The config key by which the model changes its logits before the loss (Gemma-2's
    # final_logit_softcapping): the fused loss declines (fastpath.fused_loss_refusal), transformers' loss runs.
    logit_transform: str = ""

    @property
    def q_dim(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.heads

    @property
    def kv_dim(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.kv_heads

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer: q, k, v, o, gate, up, down (Phi-3: qkv, o,
        gate_up, down)."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        if self.fused:
            return [(h, q + 2 * kv), (q, h), (h, 2 * i), (i, h)]
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def layer_16bit(self) -> list[int]:
        """Element counts of one decoder layer's 16-bit parameters: norms, q/k norms, biases."""
        head = self.head_dim or self.hidden // self.heads
        sizes = [self.hidden] * self.norms + ([head, head] if self.qk_norm else [])
        width = dict(zip(_BIAS_ORDER, [self.q_dim, self.kv_dim, self.kv_dim, self.hidden, self.intermediate,
                                       self.intermediate, self.hidden]))
        return sizes + [width[p] for p in self.bias]

    def parameters(self) -> int:
        """Weights of the base model (embeddings, layers, final norm, lm_head unless tied)."""
        per_layer = sum(a * b for a, b in self.linears()) + sum(self.layer_16bit())
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * per_layer + self.hidden

    @classmethod
    def from_hf(cls, config) -> "Shape":
        """From a transformers config (or its config.json's keys): the family's layout by model_type."""
        from qlora_dist.model.fastpath import LOGIT_TRANSFORMS

        family = getattr(config, "model_type", "llama")
        layout = dict(_FAMILY_LAYOUT.get(family, {}))
        biased = layout.get("bias", "") + "".join(b for flag, b in _BIAS_FLAGS.get(family, {}).items()
                                                  if getattr(config, flag, False))
        layout["bias"] = "".join(p for p in _BIAS_ORDER if p in biased)
        layout["logit_transform"] = next((k for k in LOGIT_TRANSFORMS if getattr(config, k, None) is not None), "")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None)
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                   getattr(config, "num_key_value_heads", None) or heads, config.vocab_size,
                   bool(getattr(config, "tie_word_embeddings", False)),
                   head_dim if head_dim and head_dim != config.hidden_size // heads else None, **layout)

    @classmethod
    def from_folder(cls, path: Path) -> "Shape":
        """From a folder's config.json, with the family's defaults (e.g. Gemma-2 ties its embeddings unless
        the file says otherwise) filled in by transformers' config class."""
        from transformers import AutoConfig

        return cls.from_hf(AutoConfig.from_pretrained(Path(path)))

    @classmethod
    def llama(cls, size: str) -> "Shape":
        from qlora_dist.recipe import LLAMA_SHAPES

        s = LLAMA_SHAPES[size]
        return cls(s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads or s.heads, s.vocab)


@dataclass(frozen=True)
class Setup:
    shape: Shape
    world_size: int = 1
    zero_stage: int = 2
    offload_optimizer: bool = False
    micro_batch: int = 1
    seq_len: int = 512
    checkpointing: bool = True
    bits: int = 4
    double_quant: bool = True
    lora_r: int = 64
    lora_dropout: bool = True
    dora: bool = False  # lora.variant=dora: a trained magnitude per output row, and DoRA's extra forward work
    attention_only: bool = False  # lora.target_modules=attention: LoRA on the attention projections alone
    optimizer: str = "paged_adamw_32bit"
    on_gpu: bool = True  # paged optimizer states live in CUDA unified memory only on a GPU
    fused_loss: bool = True  # model.fused_loss: the loss by chunks of tokens (qlora_dist/fastpath.py)
    paged_masters: bool = False  # optim.master_weights=paged: fp32 masters in CUDA unified memory
    sequence_parallel: int = 1  # dist.sequence_parallel: each rank holds 1/N of every row's positions
    offload: bool = False  # model.gradient_checkpointing=offload: checkpointed layer inputs in pinned host memory
    tiled_mlp: str = "auto"  # model.tiled_mlp: auto, on, off (model/longseq.py)
    packing: bool = False  # data.packing: packed rows are kept apart by a mask built from their position ids
    init: str = "default"  # lora.init: loftq / pissa change no trained parameter, only the loading (init_workspace)
    init_iters: int = 1
    full: bool = False  # train.method=full: every weight trained (16-bit), no LoRA

    @property
    def tokens(self) -> int:
        """Positions one rank's activations hold: its 1/N slice of the micro-batch's rows (Ulysses: the
        attention sees whole rows but 1/N of the heads, the same count of q/k/v values)."""
        return self.micro_batch * -(-self.seq_len // self.sequence_parallel)


@dataclass
class Plan:
    setup: Setup
    items: dict[str, int] = field(default_factory=dict)  # bytes one rank's allocator holds at peak
    outside: dict[str, int] = field(default_factory=dict)  # on the GPU's behalf but not in its allocator
    host_peak_load: int = 0  # peak host RAM per rank while loading
    cap: int | None = None

    @property
    def total(self) -> int:
        return sum(self.items.values())

    @property
    def fits(self) -> bool:
        return self.cap is None or self.total <= self.cap

    def to_json(self) -> dict:
        return {"fits": self.fits, "cap_bytes": self.cap, "per_rank_bytes": {"total": self.total, **self.items},
                "outside_allocator_bytes": self.outside, "host_peak_load_bytes_per_rank": self.host_peak_load,
                "setup": {k: v for k, v in asdict(self.setup).items() if k != "shape"},
                "shape": asdict(self.setup.shape)}


def _part(numel: int, n: int) -> int:
    """One ZeRO-3 rank's slice of one parameter (each parameter is padded to a multiple of n)."""
    return math.ceil(numel / n)


def quant_constant_bytes(numel: int, double_quant: bool) -> int:
    """A Linear4bit's quant_state: absmax per 64 weights (uint8 + nested fp32 absmax per 256 blocks with
    double quant, else fp32), its NF4 code (16 fp32) and, nested, a 256-entry fp32 code and an offset."""
    blocks = math.ceil(numel / NF4_BLOCK)
    if not double_quant:
        return blocks * 4 + 16 * 4
    return blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + 16 * 4 + 256 * 4 + 4


def weight_items(s: Setup) -> dict[str, int]:
    n3 = s.world_size if s.zero_stage == 3 else 1
    sh = s.shape
    nf4 = consts = linear16 = int8 = 0
    for fan_in, fan_out in sh.linears():
        numel = fan_in * fan_out
        if s.bits == 4:
            nf4 += _part(numel // 4, n3) * 2  # 4 bits a weight, packed in bf16 storage
            consts += quant_constant_bytes(numel, s.double_quant)
        elif s.bits == 8:  # LLM.int8: a byte a weight and an fp32 scale per output row (Int8Params.SCB)
            int8 += numel
            consts += fan_out * 4
        else:
            linear16 += _part(numel, n3) * 2
    tables = [sh.vocab * sh.hidden] * (1 if sh.tied else 2)
    layer16 = sum(_part(n, n3) for n in sh.layer_16bit()) * 2  # ZeRO-3 pads each parameter on its own
    w16 = sum(_part(t, n3) * 2 for t in tables) + sh.layers * layer16 + _part(sh.hidden, n3) * 2
    items = {"base_nf4": nf4 * sh.layers, "base_int8": int8 * sh.layers, "quant_constants": consts * sh.layers,
             "weights_16bit" if s.full else "base_16bit": w16 + linear16 * sh.layers}
    return {k: v for k, v in items.items() if v}


def full_numels(sh: Shape) -> list[int]:
    """Element counts of every weight of the model (train.method=full trains them all)."""
    layer = [a * b for a, b in sh.linears()] + sh.layer_16bit()
    return [sh.vocab * sh.hidden] * (1 if sh.tied else 2) + layer * sh.layers + [sh.hidden]


def adapted_linears(s: Setup) -> list[tuple[int, int]]:
    """(in, out) of each linear layer of one decoder layer that carries LoRA: every one, or with
    lora.target_modules=attention q, k, v, o (Phi-3: qkv, o), which come first in Shape.linears()."""
    return s.shape.linears()[:2 if s.shape.fused else 4] if s.attention_only else s.shape.linears()


def lora_numels(s: Setup) -> list[int]:
    """Element counts of every LoRA matrix (A: r x in, B: out x r, and with DoRA its magnitude: out), in
    model order; under train.method=full, of every weight."""
    if s.full:
        return full_numels(s.shape)
    one_layer = [n for fan_in, fan_out in adapted_linears(s)
                 for n in (s.lora_r * fan_in, fan_out * s.lora_r, *([fan_out] if s.dora else []))]
    return one_layer * s.shape.layers


def dora_activation_bytes_per_token(s: Setup) -> int:
    """What DoRA adds to one layer's saved activations per token: peft 0.21.2's DoRA output
    (m/||W + sBA|| - 1) * base + m/||W + sBA|| * s * lora keeps the base output and the LoRA output of
    every linear layer for the backward of the two products (bf16: 2 + 2 bytes per output unit)."""
    return 4 * sum(fan_out for _, fan_out in adapted_linears(s)) if s.dora else 0


def _flat_partition(total: int, n: int) -> int:
    """ZeRO-1/2 flatten all LoRA weights into one buffer padded to 2 x world size, split in n."""
    return math.ceil(total / (2 * n)) * 2


def lora_items(s: Setup) -> tuple[dict[str, int], dict[str, int]]:
    """(allocator items, items outside the allocator) of LoRA weights, grads, masters, optimizer."""
    numels = lora_numels(s)
    n = s.world_size
    if s.zero_stage == 3:
        weights = sum(_part(x, n) for x in numels) * 2
        shard = sum(_part(x, n) for x in numels)
    else:
        weights = sum(numels) * 2
        shard = _flat_partition(sum(numels), n)
    master = shard * 4
    grads = shard * 4  # accumulated and reduced in fp32 (ds_configs: grad_accum_dtype fp32)
    states = shard * (2 if "8bit" in s.optimizer else 8)
    items = {} if s.full else {"lora_weights": weights}  # full: the weights are weight_items' weights_16bit
    outside: dict[str, int] = {}
    on_host = outside if s.offload_optimizer else items  # offload keeps masters and fp32 grads in CPU memory
    on_host["grads_fp32" if s.full else "lora_grads_fp32"] = grads
    if s.paged_masters and s.on_gpu and not s.offload_optimizer:  # train/paged_masters.py
        outside["master_weights_fp32 (paged, unified memory)"] = master
    else:  # with offload the masters are on the host, paged or not
        on_host["master_weights_fp32"] = master
    paged = "paged" in s.optimizer and s.on_gpu
    if s.offload_optimizer:
        outside["optimizer_states (host)"] = states
    elif paged:
        outside["optimizer_states (paged, unified memory)"] = states
    else:
        items["optimizer_states"] = states
    return items, outside


def layer_activation_bytes_per_token(s: Setup) -> int:
    """What autograd keeps of one decoder layer per token (bf16): fitted on the real modules on CPU
    (tests/test_memory.py and tests/test_families.py re-measure it). LLaMA's layout (also Mistral, Qwen2):
    12 B per hidden unit, 4 per query unit, 8 per MLP unit, 4 per key/value unit, and LoRA dropout's copies
    and masks (16 per hidden, 4 per query, 2 per MLP unit) when dropout is on. Qwen3's q/k norms keep their
    inputs and an fp32 scale per head; Phi-3's fused projections keep less per hidden unit, more per MLP
    unit. Gemma-2 runs eager attention (no sdpa with soft-capping), which keeps the fp32 attention
    probabilities, 8 bytes per head per key (a term in the sequence length), and keys and values repeated
    to every query head."""
    sh = s.shape
    h, i, q, kv = sh.hidden, sh.intermediate, sh.q_dim, sh.kv_dim
    if sh.attention == "eager":  # fitted on Gemma-2's modules (4 norms a layer, GELU-tanh MLP)
        per = 22 * h + 6 * q + 8 * i + 160 + 8 * sh.heads * s.seq_len
        dropout = 14 * h + 4 * q + 2 * i
    else:
        per = 12 * h + 4 * q + 8 * i + 4 * kv + 120
        dropout = 16 * h + 4 * q + 2 * i
    if sh.qk_norm:
        per += 4 * (q + kv) + 4 * (sh.heads + sh.kv_heads) + 16
    if sh.fused:  # Phi-3's qkv_proj and gate_up_proj: fewer LoRA inputs kept, the 2 x MLP-wide output whole
        per += 4 * i + 2 * (q + kv) - 12 * h - 32  # fitted with LoRA dropout on (the recipe's)
    return per + (dropout if s.lora_dropout else 0)


def logits_bytes(s: Setup) -> int:
    """Peak bytes of the loss, per vocabulary entry per token as the CPU allocator's peak of a step shows
    (tests/test_planner_gaps.py). Without the fused loss (transformers' logits, model/loss.py's cross-entropy):
    the log-softmax's backward holds its saved fp32 output, the fp32 gradient coming in and the one going
    out, 12 bytes (the bf16 logits are freed by then), plus 2 where the model soft-caps its logits (tanh
    keeps its bf16 output for the backward). Such a model (Shape.logit_transform) declines the fused loss
    whatever model.fused_loss says. The fused loss: one chunk's fp32 logits and its bf16 product and
    softmax (8 bytes per entry), plus 10 bytes per hidden unit per token: the labelled hidden states gathered
    and their gradient (bf16), and the final norm's fp32 copy of its input and its output (bench/long_seq.py's
    8k rows, whose peak is this phase once the layers' backward is tiled)."""
    sh, tokens = s.shape, s.tokens
    if not s.fused_loss or sh.logit_transform:
        return (12 + 2 * (sh.logit_transform == "final_logit_softcapping")) * sh.vocab * tokens
    from qlora_dist.model.fastpath import chunk_tokens

    return 8 * sh.vocab * min(tokens, chunk_tokens(sh.vocab)) + 10 * sh.hidden * tokens


def mlp_saved_bytes_per_token(s: Setup) -> int:
    """What the MLP's own modules keep of those per token, its input aside (which the tiled MLP keeps):
    fitted like layer_activation_bytes_per_token with the tiled MLP off and on (tests/test_long_samples.py):
    8 bytes per MLP unit and 48, plus LoRA dropout's copies and masks of the MLP's inputs (2 per MLP unit,
    6 per hidden unit)."""
    i, h = s.shape.intermediate, s.shape.hidden
    return 8 * i + 48 + ((2 * i + 6 * h) if s.lora_dropout else 0)


def tiled_layer_bytes_per_token(s: Setup) -> int:
    """What one layer keeps per token where the MLP tiles, the tile's activations aside: the layer's figure
    less the MLP's (mlp_saved_bytes_per_token), and where LeanRMSNorm stands in for the two norms, less their
    fp32 copies of the input (4 bytes per hidden unit each) for the bf16 inputs (2 each): fitted like the
    others (tests/test_long_samples.py)."""
    lean = 4 * s.shape.hidden if s.shape.lean_norms else 0
    return layer_activation_bytes_per_token(s) + dora_activation_bytes_per_token(s) - mlp_saved_bytes_per_token(s) - lean


def mlp_tiles(s: Setup) -> int:
    """Tiles of the MLP (0: it runs whole) for this setup's rows (model/longseq.py tiles_for)."""
    from qlora_dist.model.longseq import tiles_for

    if s.shape.fused:  # Phi-3's gate_up_proj: the planner keeps its fitted whole-MLP figure
        return 0
    return tiles_for(s.tiled_mlp, -(-s.seq_len // s.sequence_parallel), s.shape.hidden)


def attention_mask_bytes(s: Setup) -> int:
    """The sequence x sequence mask transformers 5.24 builds for sdpa where rows are padded (a micro batch of
    several rows) or packed (documents told apart by position ids): a bool [rows, 1, L, L] kept through the
    whole step, and per attention call torch 2.13's CPU sdpa turns it into an additive mask of the query's
    dtype (2 bytes an entry). None for one unpadded row (the causal mask is skipped: is_causal) nor under
    dist.sequence_parallel (Ulysses drops the mask); eager attention's is in its per-token figure."""
    if s.sequence_parallel > 1 or s.shape.attention == "eager" or not (s.micro_batch > 1 or s.packing):
        return 0
    return 3 * s.micro_batch * s.seq_len ** 2


def offloaded_inputs(s: Setup) -> int:
    """Checkpointed layer inputs model.gradient_checkpointing=offload moves to host memory: all but the
    last layer's (DeepSpeed 0.19.8 keeps the newest on the GPU, keep_last_count=1)."""
    return max(s.shape.layers - 1, 0) if s.offload and s.checkpointing else 0


def _layer_and_backward(s: Setup) -> tuple[int, int]:
    """(what one layer keeps for its backward, the backward's transients), bytes for this rank's tokens."""
    sh, tokens = s.shape, s.tokens
    per = layer_activation_bytes_per_token(s) + dora_activation_bytes_per_token(s)
    widest = max(fan_in * fan_out for fan_in, fan_out in sh.linears())
    wide = 4 * sh.intermediate * tokens  # gradients of the MLP's widest activations
    if tiles := mlp_tiles(s):  # the MLP keeps its input alone; one tile's activations live at a time
        tile = -(-tokens // tiles)
        mlp = mlp_saved_bytes_per_token(s)
        mlp_backward = 4 * sh.intermediate * tile + 8 * sh.hidden * tokens + 2 * widest
        # With the MLP tiled, an autograd RMSNorm's backward is the layer's widest (the tile's activations
        # freed by then): five fp32 copies of the hidden state at once (the float32 cast's, pow's, mean's and
        # mul's gradients) and the bf16 gradient coming in, 22 bytes per hidden unit per token (the
        # profiler's live allocations at bench/long_seq.py's 8k tiled peak). LeanRMSNorm's is a tile's.
        # Untiled, the MLP's backward is always wider.
        norm_backward = 0 if sh.lean_norms else 22 * sh.hidden * tokens - mlp * tile
        return tiled_layer_bytes_per_token(s) * tokens + mlp * tile, max(mlp_backward, norm_backward)
    # Backward of one layer: gradients of its widest activations, and its weight dequantized to bf16.
    # DoRA's forward (recomputed in the backward) also holds, for its widest layer, the weight dequantized
    # again, B·A (peft builds it as a full matrix) and their sum for the row norms: 3 more bf16 matrices.
    return per * tokens, wide + 8 * sh.hidden * tokens + 2 * widest * (4 if s.dora else 1)


def _full_transient(s: Setup, numel: int) -> int:
    """Under train.method=full, what the backward of a piece of `numel` weights (lm_head at the loss, a decoder
    layer) holds beyond LoRA's: its bf16 gradient (2 bytes) and the fp32 copy DeepSpeed reduces
    (ds_configs' communication_data_type fp32: 4). Under ZeRO-3 also the flat buffer reduce_scatter_coalesced
    concatenates the fp32 gradients into (4; deepspeed 0.19.8 runtime/comm/coalesced_collectives.py), and the
    gradients wait for a reduce bucket to fill (reduce_bucket_size weights), so up to that many of them at once,
    the whole model's below it: 10 bytes a weight of min(all, bucket), at least the piece's (their gathered
    weights are zero3_live_gathered's). On one CPU rank the step's peak is then 2.7% above the plan, the same
    every run; on two it lay 2% to 17% below it, with how the ranks' reductions interleaved
    (tests/test_full_finetune.py). ZeRO-1/2: 6 bytes a weight of the piece, not measured."""
    if s.zero_stage != 3:
        return 6 * numel
    return 10 * max(numel, min(sum(full_numels(s.shape)), DS_BUCKET))


def activation_items(s: Setup) -> dict[str, int]:
    sh, tokens = s.shape, s.tokens
    layer, backward = _layer_and_backward(s)
    logits = logits_bytes(s)
    if s.full:  # the weights' own gradients on their way to the fp32 partitions
        logits, backward = logits + _full_transient(s, sh.vocab * sh.hidden), backward + _full_transient(
            s, sum(a * b for a, b in sh.linears()) + sum(sh.layer_16bit()))
    else:  # lm_head is frozen: the loss phase ends before the first LoRA gradient allocates ZeRO-1/2's reduce
        logits = max(logits - zero2_bucket_bytes(s), 0)  # bucket, so it shares that room (framework_items)
    extra = {"attention_mask (sequence x sequence)": m} if (m := attention_mask_bytes(s)) else {}
    if s.full and s.zero_stage == 3:
        # ds_configs/zero3.json keeps up to stage3_max_live_parameters gathered weights live, and releases none
        # reused within stage3_max_reuse_distance (1e9 too): below that size every weight may be whole at
        # once in the step (how many are depends on prefetch timing; the CPU peak varied by ~50 MB with it)
        extra["zero3_live_gathered"] = 2 * min(sum(full_numels(sh)), DS_MAX_LIVE)
    if s.checkpointing:
        # each layer's input, bf16; offloaded: the last one's, and in flight the two before it until their
        # copies end (DeepSpeed 0.19.8's max_fwd_stash_count=2)
        kept = (min(sh.layers, 3) if s.offload else sh.layers) * 2 * sh.hidden * tokens
        peak_phase = max(logits, layer + backward)
        return {"activations_checkpointed": kept, "activations_peak_phase": peak_phase, **extra}
    return {"activations": sh.layers * layer, "activations_peak_phase": max(logits, backward), **extra}


def zero2_bucket_bytes(s: Setup) -> int:
    """ZeRO-1/2's contiguous gradient bucket: deepspeed 0.19.8 (stage_1_and_2.py setup_buckets) allocates a whole
    reduce_bucket_size buffer at the first gradient of every step, whatever the count of trainable weights (2
    million LoRA weights or 2 billion): ZeRO-2 stages it in the weights' dtype (bf16), ZeRO-1 in its fp32
    accumulation dtype; freed at the step's end. Seen on CPU: 100 MB allocated at the first AccumulateGrad of
    a LoRA step, live through every layer's backward (bench/long_seq.py's 8k rows)."""
    return DS_BUCKET * (4 if s.zero_stage == 1 else 2) if s.zero_stage in (1, 2) else 0


def framework_items(s: Setup) -> dict[str, int]:
    items = {"cuda_workspace": int(CUDA_OVERHEAD) if s.on_gpu else 0}
    if s.zero_stage in (1, 2):
        items["zero_buckets"] = zero2_bucket_bytes(s)
    elif s.zero_stage == 3:
        # ZeRO-3 allocates its reduce bucket whole, reduce_bucket_size elements of the fp32 gradient
        # accumulation dtype (deepspeed 0.19.8 stage3.py _setup_for_real_optimizer), whatever the count of
        # trainable weights: full fine-tuning's and LoRA's alike, from set-up on
        items["zero_buckets"] = DS_BUCKET * 4
    return {k: v for k, v in items.items() if v}


def host_peak_load(s: Setup, loader: str = "layerwise") -> int:
    """Peak host RAM per rank while loading: layer-wise reading keeps one layer in 16 bit (plus the
    embedding table); transformers' from_pretrained materializes each checkpoint shard."""
    sh = s.shape
    layer16 = sum(a * b for a, b in sh.linears()) * 2
    embed16 = sh.vocab * sh.hidden * 2
    if loader == "layerwise":
        return max(layer16, embed16) + int(0.5 * GB)
    return 5 * GB + max(layer16, embed16)  # one 5 GB safetensors shard, as HF checkpoints are cut


def init_workspace(s: Setup) -> int:
    """What lora.init=loftq / pissa add while loading, on the loading device, one layer at a time
    (model/adapter_init.py on the largest linear layer): its weight in fp32, W - s*BA, the residual, B*A
    and the SVD's U and V^T, six fp32 matrices of its size (LAPACK's workspace is small beside them). Freed
    before training, so not part of the training peak; nothing is added to the trained parameters."""
    if s.init not in ("loftq", "pissa"):
        return 0
    return 6 * 4 * max(a * b for a, b in s.shape.linears())


def make_plan(s: Setup, cap: int | None = None) -> Plan:
    plan = Plan(setup=s, cap=cap)
    plan.items.update(weight_items(s))
    lora, outside = lora_items(s)
    plan.items.update(lora)
    plan.outside.update(outside)
    plan.items.update(activation_items(s))
    plan.items.update(framework_items(s))
    if n := offloaded_inputs(s):
        plan.outside["activations_offloaded (host, pinned)"] = n * 2 * s.shape.hidden * s.tokens
    layerwise = s.zero_stage == 3 or s.init in ("loftq", "pissa")  # model/base.py use_layerwise
    plan.host_peak_load = host_peak_load(s, "layerwise" if layerwise else "hf") + init_workspace(s)
    return plan


# Host memory a training rank holds besides what the plan lists (an assumption, not a measurement): the
# Python process with torch and the CUDA context, the memory-mapped tokenized rows, the engine's buffers.
HOST_OVERHEAD = 4 * GB
MAX_SEARCHED_LENGTH = 2 ** 24  # 16.8 M tokens: the longest sample `plan --max-seq` looks for


def host_training_bytes(plan: Plan) -> int:
    """Host memory one rank fills while training: offloaded layer inputs and, with an offload ds_config,
    the fp32 gradients, masters and optimizer states, plus HOST_OVERHEAD; or its loading peak if larger."""
    s = plan.setup
    keys = [k for k in plan.outside if "(host" in k]
    keys += ["lora_grads_fp32", "master_weights_fp32"] if s.offload_optimizer else []
    return max(plan.host_peak_load, sum(plan.outside.get(k, 0) for k in keys) + int(HOST_OVERHEAD))


def _longest(fits) -> int:
    """The largest length in [1, MAX_SEARCHED_LENGTH] for which fits(length) holds (0: none), by bisection:
    every item grows with the length (model.tiled_mlp=auto's switch at 8k tokens aside)."""
    if not fits(1):
        return 0
    low, high = 1, MAX_SEARCHED_LENGTH
    if fits(high):
        return high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def longest_sample(s: Setup, gpu_cap: int, host_cap: int | None = None, ranks_per_host: int = 1) -> dict:
    """The longest sample (tokens, a micro batch of one) whose plan fits `gpu_cap` per GPU and whose host
    memory, for the `ranks_per_host` ranks of a machine, fits `host_cap`; and which of the two binds."""
    s = replace(s, micro_batch=1)

    def gpu_fits(length: int) -> bool:
        return make_plan(replace(s, seq_len=length)).total <= gpu_cap

    def host_fits(length: int) -> bool:
        return host_cap is None or ranks_per_host * host_training_bytes(make_plan(replace(s, seq_len=length))) <= host_cap

    gpu, host = _longest(gpu_fits), _longest(host_fits)
    binding = "gpu" if gpu <= host else "host"
    return {"max_seq_len": min(gpu, host), "gpu_limit": gpu, "host_limit": None if host_cap is None else host,
            "binding": binding, "gpu_cap_bytes": gpu_cap, "host_cap_bytes": host_cap}


def longer_sample_changes(s: Setup, gpu_cap: int, host_cap: int | None = None, ranks_per_host: int = 1) -> list[dict]:
    """The long-sample settings this setup does not use yet, each alone and then all together, with the
    longest sample each gives (only those that reach further than the setup itself)."""
    changes = []
    if s.checkpointing and not s.offload:
        changes.append(("model.gradient_checkpointing=offload", {"offload": True}))
    if s.tiled_mlp == "off":
        changes.append(("model.tiled_mlp=auto", {"tiled_mlp": "auto"}))
    if s.lora_dropout and not s.full:
        changes.append(("lora.dropout=0", {"lora_dropout": False}))
    if s.zero_stage < 3 and not s.offload_optimizer:
        changes.append(("dist.ds_config=zero2_offload", {"zero_stage": 2, "offload_optimizer": True}))
    if len(changes) > 1:
        changes.append((" ".join(k for k, _ in changes), {k: v for _, c in changes for k, v in c.items()}))
    base = longest_sample(s, gpu_cap, host_cap, ranks_per_host)["max_seq_len"]
    found = [{"change": key, **longest_sample(replace(s, **fields), gpu_cap, host_cap, ranks_per_host)}
             for key, fields in changes]
    return [f for f in found if f["max_seq_len"] > base]


def format_longest(found: dict, s: Setup, further: list[dict] = ()) -> str:
    host = found["host_limit"]
    options = (f"checkpointing {'offloaded' if s.offload else 'on' if s.checkpointing else 'off'}, "
               f"tiled MLP {s.tiled_mlp}")
    lines = [f"longest sample ({options}, micro batch 1): {found['max_seq_len']:,} tokens",
             f"  GPU cap {found['gpu_cap_bytes'] / GB:.1f} GB holds {found['gpu_limit']:,} tokens"]
    if host is not None:
        lines.append(f"  host cap {found['host_cap_bytes'] / GB:.1f} GB holds {host:,} tokens")
    lines.append(f"  binding: the {'GPU' if found['binding'] == 'gpu' else 'host'} memory")
    lines += [f"  further with {f['change']}: {f['max_seq_len']:,} tokens ({f['binding']} binds)" for f in further]
    return "\n".join(lines)


def cheaper_changes(s: Setup, cap: int) -> list[tuple[str, Setup]]:
    """Candidate changes, cheapest in speed first."""
    out: list[tuple[str, Setup]] = []
    if not s.checkpointing:
        out.append(("turn activation checkpointing on (model.gradient_checkpointing=true)",
                    replace(s, checkpointing=True)))
    if not s.paged_masters and not s.offload_optimizer and s.on_gpu:  # no host step: cheaper than offload
        out.append(("keep fp32 masters in paged memory (optim.master_weights=paged)", replace(s, paged_masters=True)))
    if s.zero_stage < 3 and not s.offload_optimizer:
        # ds_configs/zero2_offload.json: the fp32 state goes to host memory, the base stays whole on each rank
        # (no ZeRO-3 gathers) and the micro batch stays as it is (at 65B 8 -> 4 x 512 costs ~20% of tokens/s,
        # relative_speed); the host step is the price.
        out.append(("fp32 masters, gradients and optimizer states in CPU memory (dist.ds_config=zero2_offload)",
                    replace(s, zero_stage=2, offload_optimizer=True)))
    if s.micro_batch > 1:
        half = s.micro_batch // 2
        out.append((f"micro batch {half} with twice the accumulation (train.micro_batch_size={half})",
                    replace(s, micro_batch=half)))
    if s.zero_stage < 3:
        ds = "zero3_offload" if s.offload_optimizer else "zero3"
        out.append((f"partition the NF4 base across ranks (dist.ds_config={ds})", replace(s, zero_stage=3)))
    if not s.offload_optimizer:
        out.append(("offload optimizer states to CPU memory (dist.ds_config=zero3_offload)",
                    replace(s, zero_stage=3, offload_optimizer=True)))
    out.append((f"more ranks ({2 * s.world_size})", replace(s, world_size=2 * s.world_size)))
    return out


def suggest(s: Setup, cap: int, depth: int = 3) -> list[str] | None:
    """The shortest sequence of cheap changes that makes the plan fit the cap (None if none found)."""
    frontier: list[tuple[list[str], Setup]] = [([], s)]
    for _ in range(depth):
        nxt = []
        for steps, cur in frontier:
            for text, changed in cheaper_changes(cur, cap):
                if make_plan(changed, cap).fits:
                    return steps + [text]
                nxt.append((steps + [text], changed))
        frontier = nxt[:64]
    return None


def adapter_description(s: Setup) -> str:
    """'LoRA r=64: 160,432,128 trainable parameters' (with DoRA, how many of them are magnitudes)."""
    total = sum(lora_numels(s))
    if s.full:
        return f"full fine-tuning: {total:,} trainable parameters (every weight)"
    magnitudes = sum(fan_out for _, fan_out in adapted_linears(s)) * s.shape.layers if s.dora else 0
    extra = f", of which {magnitudes:,} DoRA magnitudes" if s.dora else ""
    start = {"loftq": f"; LoftQ start ({s.init_iters} step{'s' * (s.init_iters > 1)}: {s.init_iters} SVDs and "
                      f"NF4 round trips per layer while loading)",
             "pissa": "; PiSSA start (one SVD per layer while loading)"}.get(s.init, "")
    return f"{'DoRA' if s.dora else 'LoRA'} r={s.lora_r}: {total:,} trainable parameters{extra}{start}"


def format_plan(plan: Plan) -> str:
    s = plan.setup
    head = (f"per-rank memory plan: {s.shape.layers} layers x {s.shape.hidden} hidden, {'16-bit weights, all trained' if s.full else f'{s.bits}-bit base'}, "
            f"ZeRO-{s.zero_stage}{' + optimizer offload' if s.offload_optimizer else ''}, {s.world_size} rank(s), "
            f"micro batch {s.micro_batch} x {s.seq_len} tokens"
            f"{f' split over {s.sequence_parallel} ranks (dist.sequence_parallel)' if s.sequence_parallel > 1 else ''}, "
            f"checkpointing {'on, inputs offloaded' if s.offload and s.checkpointing else 'on' if s.checkpointing else 'off'}"
            f"{f', MLP in {t} tiles' if (t := mlp_tiles(s)) else ''}")
    width = max([44] + [len(k) + 2 for k in plan.outside])  # the figures in one column
    lines = [head, f"  adapter: {adapter_description(s)}"]
    lines += [f"  {k:<{width}}{v / GB:>9.2f} GB" for k, v in plan.items.items()]
    lines.append(f"  {'total on the GPU':<{width}}{plan.total / GB:>9.2f} GB")
    if plan.outside:
        lines.append("  outside the GPU allocator:")
        lines += [f"    {k:<{width - 2}}{v / GB:>9.2f} GB" for k, v in plan.outside.items()]
    lines.append(f"  {'host RAM per rank while loading':<{width}}{plan.host_peak_load / GB:>9.2f} GB")
    if workspace := init_workspace(s):
        lines.append(f"    {'of which lora.init=' + s.init + ' workspace':<{width - 2}}{workspace / GB:>9.2f} GB")
    if plan.cap is not None:
        lines.append(f"  cap {plan.cap / GB:.2f} GB per GPU: {'fits' if plan.fits else 'DOES NOT FIT'}")
    return "\n".join(lines)


def sequence_parallel_problems(cfg, world_size: int, shape: Shape | None = None) -> list[str]:
    """What dist.sequence_parallel=N > 1 (Ulysses, DeepSpeed 0.19.8) cannot run, from the config and the
    model's shape (if known) alone (`plan` and the preflight; the preflight adds the sliding window, from the
    model's config). The heads (and KV heads) are dealt to the N ranks of a group; its attention drops the mask and
    attends causally over each gathered row, so packed rows (documents kept apart only by the mask built
    from their position ids) would attend across documents; eager attention materialises the mask
    DeepSpeed refuses to carry."""
    n, keys = cfg.dist.sequence_parallel, f"dist.sequence_parallel={cfg.dist.sequence_parallel}"
    if n == 1:
        return []
    errs = []
    if world_size % n:
        errs.append(f"{keys}: the world size {world_size} is not a multiple of it (world = sequence_parallel x "
                    "data-parallel size); start a multiple of it in ranks")
    if cfg.data.packing:
        errs.append(f"data.packing=true with {keys}: Ulysses attention drops the mask that keeps packed documents "
                    "apart (DeepSpeed 0.19.8, sdpa); set data.packing=false or dist.sequence_parallel=1")
    if cfg.model.attn_implementation == "eager":
        errs.append(f"model.attn_implementation=eager with {keys}: eager attention materialises a full "
                    "sequence x sequence mask, which Ulysses refuses; use model.attn_implementation=sdpa")
    if shape is None:
        return errs
    if shape.heads % n or (shape.kv_heads % n and n % shape.kv_heads):
        errs.append(f"{keys}: {cfg.model.path} has {shape.heads} attention heads and {shape.kv_heads} KV heads; "
                    f"Ulysses deals the heads to the {n} ranks of a group: both must be multiples of it (or it "
                    "of the KV heads)")
    if shape.attention == "eager":
        errs.append(f"{keys}: {cfg.model.path} runs eager attention only (soft-capping), which Ulysses refuses (a "
                    "full sequence x sequence mask); this family cannot use sequence parallelism")
    return errs


# ---------------------------------------------------------------------------------------------------
# From a run's config: the plan `train` checks before loading, and `train.micro_batch_size=auto`.

def shape_for(cfg) -> Shape:
    """The model's shape from its config.json (or a `random:<size>` name), or, for a paper preset without a
    model, the LLaMA size."""
    from qlora_dist.model import folder as model_folder
    from qlora_dist.model.builtin import is_builtin, random_llama_config, random_size, resolve_model_path

    path = cfg.model.path
    if size := random_size(path):
        return Shape.from_hf(random_llama_config(size))
    from qlora_dist.errors import ConfigError

    if path and (is_builtin(path) or (Path(path) / "config.json").is_file()):
        folder = resolve_model_path(path)
        if problems := model_folder.config_problems(folder):
            raise ConfigError(problems)  # a family we cannot train, or a config we cannot read: no plan either
        return Shape.from_folder(folder)
    from qlora_dist.recipe import PAPER_SIZES

    if cfg.preset and cfg.preset.split("-")[0] in PAPER_SIZES:
        return Shape.llama(cfg.preset.split("-")[0])

    raise ConfigError([f"model.path: cannot read the model's shape from {path!r} (no config.json); "
                       "the plan needs the model folder or a paper preset such as 65b-all"])


# `--preset oasst1` (a dataset alone, recipe.DATASET_PRESETS): the size class from the model's parameter count.
def size_class(parameters: int) -> str:
    """The paper's size class nearest to a parameter count, by ratio (an 8B model is 7b, a 72B one 65b)."""
    import math

    from qlora_dist.recipe import PAPER_SIZES

    return min(PAPER_SIZES, key=lambda s: abs(math.log(parameters / Shape.llama(s).parameters())))


def sized_preset(dataset: str, cfg) -> str:
    """The paper preset of `dataset` for the size class of cfg's model (model.path: a folder's config.json,
    a built-in or random: name); logged. A ConfigError when the model's size cannot be read."""
    from qlora_dist.errors import ConfigError
    from qlora_dist import dist

    if not cfg.model.path or "model.path" not in cfg.user_keys:  # the default (smollm2) is no paper base
        raise ConfigError([f"--preset {dataset}: takes its size class (7b/13b/33b/65b) from the model's parameter "
                           f"count: set model.path, or name the size (--preset 65b-{dataset})"])
    params = shape_for(cfg).parameters()
    name = f"{size_class(params)}-{dataset}"
    dist.log(f"--preset {dataset}: {cfg.model.path} has {params / 1e9:.2f}B parameters; nearest size class "
             f"{name.split('-')[0]}: preset {name}")
    return name


def setup_from_config(cfg, world_size: int, shape: Shape | None = None, micro_batch: int | None = None,
                      checkpointing: bool | None = None, on_gpu: bool | None = None) -> Setup:
    import torch

    from qlora_dist.ds_files import read_ds_config, zero_stage

    ds, _ = read_ds_config(cfg.dist.ds_config)
    full = cfg.train.method == "full"
    return Setup(
        shape=shape or shape_for(cfg), world_size=world_size, zero_stage=zero_stage(ds),
        offload_optimizer="offload_optimizer" in ds.get("zero_optimization", {}),
        micro_batch=micro_batch or int(cfg.train.micro_batch_size),
        seq_len=cfg.data.source_max_len + cfg.data.target_max_len,
        checkpointing=bool(cfg.model.gradient_checkpointing if checkpointing is None else checkpointing),
        offload=cfg.model.gradient_checkpointing == "offload", tiled_mlp=cfg.model.tiled_mlp, packing=cfg.data.packing,
        bits=cfg.quantization.bits, double_quant=cfg.quantization.double_quant, lora_r=cfg.lora.r,
        lora_dropout=cfg.lora.dropout > 0 and not full, dora=cfg.lora.variant == "dora" and not full,
        attention_only=list(cfg.lora.target_modules) == ["attention"],
        optimizer=cfg.optim.name, on_gpu=torch.cuda.is_available() if on_gpu is None else on_gpu,
        fused_loss=cfg.model.fused_loss and not full,  # a trained lm_head declines it (fastpath.fused_loss_refusal)
        paged_masters=cfg.optim.master_weights == "paged", sequence_parallel=cfg.dist.sequence_parallel, full=full,
        init=cfg.lora.init, init_iters=cfg.lora.init_iters)


def relative_speed(s: Setup) -> float:
    """Tokens/s, relative, for choosing among setups that fit: larger micro batches fill the GPU better
    (the reference's 4/16/32 x 512 runs: 3,443 / 5,452 / 5,604 tokens/s), and recomputing activations
    costs ~1/3 (7B 8 x 512 without: 7,012 tokens/s, ../shared/RECIPE.md)."""
    return s.micro_batch / (s.micro_batch + 3) * (1.0 if s.checkpointing else 1.4)


def choose_micro_batch(cfg, world_size: int, cap: int, shape: Shape | None = None,
                       on_gpu: bool | None = None) -> Setup | None:
    """The fastest (micro batch, checkpointing) whose plan fits the cap; None when nothing fits."""
    per_rank = cfg.train.global_batch_size // cfg.dist.data_parallel(world_size)  # rows per group
    sizes = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
    shape = shape or shape_for(cfg)
    fitting = [s for m in sizes for ckpt in (False, True)
               if make_plan(s := setup_from_config(cfg, world_size, shape, m, ckpt, on_gpu), cap).fits]
    return max(fitting, key=relative_speed) if fitting else None
