"""Work-arounds for known problems of the libraries we build on, each with its reason.

Versions: torch 2.13.0, deepspeed 0.19.8, transformers 5.24.0, peft 0.21.2, bitsandbytes 0.50.2.
Anything that patches around a library lives here, so it can be removed in one place when fixed.
"""
from __future__ import annotations

import atexit
import errno
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch


def set_library_env() -> None:
    """Environment the libraries read at import time; call before importing them."""
    if not torch.cuda.is_available():
        # deepspeed 0.19.8 warns on every import when it has to guess the CPU accelerator.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # glibc keeps freed per-layer buffers of the loader in its arenas: without this a rank's memory
    # grew ~25 MB per layer instead of its shard (../shared/STACK-NOTES.md). Read at process start,
    # so it matters for ranks the launchers start, which inherit it.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    # The tokenizers library forks worker threads that deadlock after a fork (DataLoader, launchers).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


SHM_COMM_OP = "deepspeed_shm_comm"


def import_deepspeed():
    """`import deepspeed`, without the mlflow import that comes with it. deepspeed 0.19.8 imports mlflow when
    it is installed (autotuning/autotuner.py: `try: import mlflow`, reached from deepspeed.runtime.config) for
    the autotuner, which we never run; mlflow is installed here as train.report_to's tracker, and its import
    was most of deepspeed's: ~80% of it, ~1 s of every rank's start (python -X importtime). So deepspeed is
    imported once with mlflow hidden (a None entry in sys.modules makes `import mlflow` fail at once), and
    mlflow imports normally afterwards, for a tracker that wants it."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None
    try:
        import deepspeed
    finally:
        if hide and "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    return deepspeed


def deepspeed_cpu_op_dir() -> Path | None:
    """The folder torch builds and caches deepspeed's CPU shared-memory op in ($TORCH_EXTENSIONS_DIR, else
    ~/.cache/torch_extensions/py311_cpu, per torch 2.13 cpp_extension._get_build_directory, which we call
    so the answer cannot drift from torch's); None when deepspeed was installed with the op prebuilt."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    if installed_ops.get(SHM_COMM_OP, False):
        return None
    return Path(_get_build_directory(SHM_COMM_OP, verbose=False))


def deepspeed_cpu_op_to_build() -> Path | None:
    """Where deepspeed.init_distributed is about to build its CPU op (None: nothing to build). deepspeed 0.19.8's init_distributed creates
    comm.torch.TorchBackend, whose __init__ calls build_shm_op(): with the CPU accelerator it JIT-compiles
    `deepspeed_shm_comm` (OpBuilder.jit_load -> torch.utils.cpp_extension.load: g++ and ninja, ~40 s on
    2 cores) on every CPU run, one rank or many, unless the .so is already in the extensions folder.
    dist.init says so rather than leave a silent minute."""
    if torch.cuda.is_available() or sys.platform != "linux":  # the op is CPU- and Linux-only
        return None
    folder = deepspeed_cpu_op_dir()
    if folder is None or (folder / f"{SHM_COMM_OP}.so").is_file():
        return None
    return folder


def load_deepspeed_cpu_op() -> None:
    """Load deepspeed's CPU op (building it the first time) under a lock of ours, before init_distributed.

    torch 2.13's cpp_extension.load guards every load, even of an op already built, with a FileBaton: a
    `lock` file created with O_EXCL and removed at the end, whose waiters poll for it forever. A process
    killed inside that window (a kill -9, a timeout) leaves the file behind, and every later run on this
    machine then hangs in FileBaton.wait before its first step (seen here: a rank killed by a test while
    it loaded the op). So each process loads the op itself while holding an flock beside the folder
    (the kernel drops it when the holder dies): under it, a `lock` file can only be a dead process's
    and is removed. deepspeed 0.19.8 keeps the loaded module (OpBuilder._loaded_ops), so TorchBackend's
    own build_shm_op() then returns it without touching the baton."""
    import fcntl

    if torch.cuda.is_available() or sys.platform != "linux":  # the op is CPU- and Linux-only
        return
    folder = deepspeed_cpu_op_dir()
    if folder is None:
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.qlora-lock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            if (folder / "lock").exists():
                print(f"[qlora-dist] removing {folder / 'lock'}, left by a process killed while it loaded "
                      "deepspeed's CPU op", file=sys.stderr, flush=True)
                (folder / "lock").unlink(missing_ok=True)
            import deepspeed.ops
            from deepspeed.accelerator import get_accelerator

            # deepspeed.comm.torch.build_shm_op's own steps, without its "built successfully" print
            # (TorchBackend prints it again when it takes the loaded module)
            builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
            if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
                builder.load()
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def quiet_known_warnings() -> None:
    # torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor, which deepspeed 0.19.8
    # calls on every ZeRO step: one warning per rank per call site, nothing for a user to act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    # transformers 5.24 renamed gradient checkpointing to activation checkpointing; peft 0.21 still
    # calls the old names.
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated")
    quiet_bitsandbytes()


def quiet_bitsandbytes() -> None:
    # bitsandbytes 0.50.2 logs "Failed to load CPU gemm_4bit_forward from kernels-community" on every
    # import when the optional `kernels` package is absent; its own CPU kernels are used instead.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*kernels-community.*")


def disable_cpu_weight_repacking(model: torch.nn.Module) -> None:
    """bitsandbytes 0.50.2 on CPUs with avx512_bf16: a Linear4bit run in eval() without grad repacks
    its weight in place into a CPU-only layout. Logits then differ by ~3e-3 from the training path and
    a later ZeRO-3 state dict fails ('packed_weight should be [N, K/2]'). Turn it off right after load."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def release_freed_memory() -> None:
    """glibc keeps freed per-layer buffers in its arenas unless told to return them: without this a
    rank's resident memory grew ~25 MB per layer while loading instead of its ~3.5 MB shard
    (../shared/STACK-NOTES.md). CUDA memory goes back to PyTorch's cache, which reuses it anyway."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc (e.g. musl): nothing to trim
            pass


def paged_optimizer_note() -> str | None:
    """Paged optimizers page their states through CUDA unified memory; on CPU bitsandbytes falls back
    to ordinary (non-paged) states. Say so once rather than letting it warn per parameter."""
    if torch.cuda.is_available():
        return None
    warnings.filterwarnings("ignore", message=".*[Pp]aged.*")
    return "no CUDA: the paged optimizer runs non-paged (paging needs CUDA unified memory)"


def repage_optimizer_states(zero_optimizer, page=None, on_device=lambda p: p.device.type == "cuda") -> int:
    """bitsandbytes 0.50.2: `Optimizer8bit.load_state_dict` (what DeepSpeed's load_checkpoint calls on the
    client optimizer) leaves the loaded states as ordinary tensors, and the next `step` moves them into the GPU
    allocator (`to_gpu`): a resumed run's paged AdamW states, 8 bytes per LoRA parameter, would leave unified
    memory for the allocator the plan keeps them out of. Here each state a fresh paged optimizer would have
    paged (get_state_buffer: paged optimizer, CUDA parameter of >= 1e5 elements) is copied into a paged buffer
    again; DeepSpeed's links to the state fragments are rebuilt on their next use. `page(p, dtype)` and
    `on_device(p)`: tests stand in for CUDA. Returns the bytes moved."""
    optimizer = getattr(zero_optimizer, "optimizer", zero_optimizer)  # the client optimizer under DeepSpeed's
    if not getattr(optimizer, "is_paged", False):
        return 0
    page = page or optimizer.get_state_buffer
    moved = 0
    for p, state in optimizer.state.items():
        if not isinstance(p, torch.Tensor) or not on_device(p) or p.numel() < 1e5:
            continue
        for key in ("state1", "state2"):
            old = state.get(key)
            if isinstance(old, torch.Tensor) and old.shape == p.shape and not getattr(old, "is_paged", False):
                new = page(p, dtype=old.dtype)
                new.copy_(old)
                state[key] = new
                moved += new.numel() * new.element_size()
    if moved:
        relink_deepspeed_fragments(zero_optimizer, masters_moved=False)
    return moved


def relink_deepspeed_fragments(zero_optimizer, masters_moved: bool) -> None:
    """deepspeed 0.19.8 ZeRO-1/2 and BF16_Optimizer map each LoRA weight to views of its fp32 master
    (`_hp_mapping`, built at init and after a load) and, lazily, of its optimizer states: after we swap
    either storage, the map must be rebuilt on the new one (safe_get/set_full_* and resharding read it).
    ZeRO-3 narrows its masters at each use instead: nothing to do there."""
    if not hasattr(zero_optimizer, "_hp_optimizer_states_linked"):
        return
    if masters_moved:
        zero_optimizer._link_all_hp_params()
    zero_optimizer._hp_optimizer_states_linked = False  # states linked again on their next use


def engine_train_mode(engine) -> None:
    # transformers returns from_pretrained models in eval mode and deepspeed.initialize keeps it:
    # without this, LoRA dropout is silently off during training.
    engine.train()


# DeepSpeed 0.19.8 load_checkpoint of a 4-bit PEFT model: the Params4bit quant-state keys are
# 'unexpected' to a strict load, and exclude_frozen_parameters saves only the LoRA weights anyway.
LOAD_MODULE_STRICT = False


def force_hub_offline() -> None:
    """Named datasets are read offline only. datasets 5.2 and huggingface_hub read HF_HUB_OFFLINE /
    HF_DATASETS_OFFLINE once, at import (transformers imports both early), so setting the variable later
    changes nothing and `load_dataset` of an uncached name retries the network for ~20 s before failing."""
    import datasets
    from huggingface_hub import constants

    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    constants.HF_HUB_OFFLINE = True


# deepspeed 0.19.8 pickles these (its own classes) into the engine's optimizer-state files; everything
# else in them is tensors, containers and numbers. torch.load(weights_only=True) refuses any global that
# is not allow-listed, so listing exactly these lets us read the files without running code from them.
def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path, map_location="cpu", _load=None, **kwargs):
    """torch.load of a file we wrote (an engine state, a legacy RNG file): weights_only=True, with only
    DeepSpeed's own plain classes allowed. A crafted pickle fails to load instead of running code."""
    kwargs.pop("weights_only", None)
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return (_load or torch.load)(path, map_location=map_location, weights_only=True, **kwargs)


def load_engine_files_safely(engine) -> None:
    """deepspeed 0.19.8's TorchCheckpointEngine.load calls torch.load(weights_only=False) for every
    engine file (model states, optimizer states): route this engine's loads through safe_torch_load."""
    engine.checkpoint_engine.load = lambda path, map_location=None: safe_torch_load(path, map_location or "cpu")


@contextmanager
def weights_only_torch_load():
    """deepspeed 0.19.8's zero_to_fp32 helpers (used by train/reshard.py) call torch.load(weights_only=False)
    directly: within this block torch.load means safe_torch_load."""
    original = torch.load
    torch.load = lambda path, map_location="cpu", **kw: safe_torch_load(path, map_location, _load=original, **kw)
    try:
        yield
    finally:
        torch.load = original


# torch 2.13's zip writer (PyTorchStreamWriter) reports a full disk as "enforce fail at
# inline_container.cc ... unexpected pos" (a RuntimeError, no errno); Python's own writes raise
# OSError(ENOSPC). Both mean the same thing to a user.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("unexpected pos" in text or "No space left" in text)


def exit_without_finalization(code: int) -> None:
    """End the process now with `code`, after the atexit handlers and a flush, skipping the interpreter's
    finalization. Why: with torch 2.13 + deepspeed 0.19.8 over gloo, a rank whose work was done and whose
    process group was destroyed aborted at exit ("terminate called without an active exception",
    SIGABRT) in about 1 of 40 two-rank jobs — a job that had written everything reported a failure. Process
    groups that DeepSpeed's globals still reference are destroyed during finalization, where gloo's
    threads meet a half torn-down interpreter (pytorch PR #179291 describes the mechanism). Only for a
    process that was one of several ranks (dist.leave)."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to say
            pass
    os._exit(code)


def register_ulysses(model: torch.nn.Module, attn_implementation: str, size: int, micro_batch: int):
    """DeepSpeed 0.19.8's Ulysses attention for dist.sequence_parallel=`size`: its process groups and its
    mpu (for deepspeed.initialize), from UlyssesSPAttentionHF.register_with_transformers, with one gap
    filled. That call replaces ALL_ATTENTION_FUNCTIONS[attn_implementation] for the whole process, and
    its wrapper drops the attention mask before anything else, even where disable_in_eval then bypasses
    the all-to-all: evaluation and generation after training (full rows on every rank, left padding, a KV
    cache) ran without their mask, 0.39 off a fresh process's on rank 1. So the function installed here
    sends only the training forward of a model marked by `use_ulysses` through Ulysses, and everything
    else (eval mode, another model of the process) to the original attention, mask and all. Call once
    per process (DeepSpeed asserts on a second call)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS[attn_implementation]
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model, attn_implementation, size, micro_batch, seq_length_is_variable=True, disable_in_eval=True)
    ulysses = ALL_ATTENTION_FUNCTIONS[attn_implementation]

    def attention(module, *args, **kwargs):
        chosen = ulysses if module.training and getattr(module, ULYSSES_MARK, False) else original
        return chosen(module, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[attn_implementation] = attention
    return mpu


ULYSSES_MARK = "_qlora_ulysses"  # set on the modules of a model that trains under sequence parallelism


def use_ulysses(model: torch.nn.Module) -> None:
    for module in model.modules():
        setattr(module, ULYSSES_MARK, True)


def forget_deepspeed_mpu() -> None:
    """deepspeed 0.19.8 keeps the mpu of an engine in deepspeed.utils.groups.mpu, where every later engine
    of the process finds it, mpu or not: after a sequence-parallel engine, one without would still divide
    its gradients and batches by the old group's size. An engine without sequence parallelism clears it."""
    from deepspeed.utils import groups

    groups.mpu = None


def forget_deepspeed_groups() -> None:
    """deepspeed 0.19.8 caches process groups in deepspeed.utils.groups (the clone of the world group that
    deepspeed.initialize broadcasts over, the mpu, the expert groups) and never drops them. After
    destroy_process_group, a second run in the same process (two Trainers in one test process, a notebook)
    found the destroyed clone there and failed in deepspeed.initialize ("Group ... is not registered").
    dist.shutdown calls this once the group is destroyed."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    groups._WORLD_GROUP = groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = groups.mpu = None
    for cache in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS, groups._ALL_TO_ALL_GROUP,
                  groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
        cache.clear()


def gradient_divisor(engine, world_size: int, sequence_parallel: int) -> int:
    """What DeepSpeed 0.19.8 divides the summed gradients of a step by (model/loss.py backward multiplies
    it back). ZeRO-1/2, and ZeRO-3's contiguous path, divide by world / sequence_parallel_size once the
    Ulysses mpu is there (stage_1_and_2.average_tensor, stage3.__avg_scatter_contiguous_grads); ZeRO-3's
    default path, reduce_scatter=true (stage3.__avg_scatter_grads -> reduce_scatter_coalesced), divides
    by the whole world, sequence parallel or not: without this, ZeRO-3 under dist.sequence_parallel=2
    trained on half the gradient (its norm was exactly half the one rank's)."""
    optimizer = getattr(engine, "optimizer", None)
    if sequence_parallel > 1 and engine.zero_optimization_stage() == 3 and getattr(optimizer, "reduce_scatter", True):
        return world_size
    return world_size // sequence_parallel

# ------------------------------------------------------------------------------ DoRA under ZeRO-3
@contextmanager
def dora_magnitude_from_row_norms(attribute: str):
    """peft 0.21.2's DoRA sets its magnitude to the row norms of W + s*BA, reading W inside
    gather_params_ctx, which gathers only when transformers' is_deepspeed_zero3_enabled() is true. Our
    layer-wise loader partitions each layer as it loads it (without HfDeepSpeedConfig, which that loader
    cannot run under), so peft reads an empty slice ("shape '[64, 32]' is invalid for input of size 0").
    Within this block a base layer that carries its row norms (model/loader.py ROW_NORMS, taken before
    partitioning) gets them as its magnitude; they are peft's value exactly while B is zero, which is how
    peft starts B (also in PeftModel.from_pretrained, which loads the saved magnitude over it afterwards)."""
    from peft.tuners.lora.dora import DoraLinearLayer

    original = DoraLinearLayer.update_layer

    def update_layer(self, *, base_layer, lora_A, lora_B, scaling, place_on_cpu=False):
        norms = getattr(base_layer, attribute, None)
        if norms is None or not hasattr(base_layer.weight, "ds_id"):  # whole weight: peft's own computation
            return original(self, base_layer=base_layer, lora_A=lora_A, lora_B=lora_B, scaling=scaling,
                            place_on_cpu=place_on_cpu)
        if bool(lora_B.any()):
            raise RuntimeError("DoRA under ZeRO-3: the magnitude from row norms needs lora_B to start at zero")
        self.weight = torch.nn.Parameter(norms.to(lora_A.device).clone(), requires_grad=True)

    DoraLinearLayer.update_layer = update_layer
    try:
        yield
    finally:
        DoraLinearLayer.update_layer = original


def dora_dequantize_in_place() -> None:
    """peft 0.21.2's DoRA reads the base weight through dequantize_module_weight, which on CPU ends with
    `module.weight = module.weight.to(device)` (for 8-bit weights, which its dequantization moves). For a
    Params4bit, .to() returns a new parameter: under ZeRO-3 the layer's partitioned weight is replaced
    by a plain copy of the gathered one, and the next fetch fails ("'Params4bit' object has no attribute
    'ds_status'"). Here a 4-bit weight is dequantized and left where it is; anything else is peft's.
    Installed once per process, on the name peft's DoRA module calls."""
    from peft.tuners.lora import dora

    if getattr(dora.dequantize_module_weight, "_qlora_dist", False):
        return
    original = dora.dequantize_module_weight

    def dequantize_module_weight(module):
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "Params4bit" and weight.quant_state is not None:
            import bitsandbytes.functional as bnbf

            return bnbf.dequantize_4bit(weight.data, weight.quant_state)
        return original(module)

    dequantize_module_weight._qlora_dist = True
    dora.dequantize_module_weight = dequantize_module_weight


def gather_base_weight_in_dora_forward(model: torch.nn.Module) -> int:
    """peft 0.21.2's DoRA forward dequantizes the base weight again, after the base layer's own forward has
    run (it needs ||W + s*BA|| per row). Under ZeRO-3 the weight is gathered only for its own module's
    forward and partitioned again right after, so DoRA would read a slice. Registering it as an external
    parameter of the LoRA layer (DeepSpeed's mechanism for a weight used in another module's forward)
    keeps it gathered for the whole LoRA layer's forward (and its recomputation). Harmless without
    ZeRO-3 (the registry is only read by ZeRO-3's hooks). Returns how many layers were registered."""
    import deepspeed

    count = 0
    for module in model.modules():
        if getattr(module, "lora_magnitude_vector", None) and hasattr(module, "base_layer"):
            deepspeed.zero.register_external_parameter(module, module.get_base_layer().weight)
            count += 1
    return count


def checkpoint_offload(**options):
    """DeepSpeed 0.19.8's offload of checkpointed layer inputs (runtime/activation_checkpointing/
    offload_activations.py: CheckpointHiddenStatesOffload), chosen over torch.autograd.graph.save_on_cpu
    because it moves only the inputs of the checkpointed decoder layers (save_on_cpu would move every tensor
    saved outside them: the loss's hidden gradient, the final norm's input), copies them on a side stream
    into a reused pool of pinned buffers (save_on_cpu pins a new buffer per tensor and copies on the
    compute stream), and keeps the last layer's input on the GPU, which the backward needs first.

    One change: its unpack hook restores with cache=True, which keeps every restored input on the GPU in
    `_restored` until the context exits, that is, until the backward has ended; by the first layer's
    backward all layers' inputs would be back on the GPU, the peak of plain checkpointing. torch's
    non-reentrant checkpoint (2.13) unpacks a layer's inputs once per backward (one recomputation), so
    here each restore is consumed once and freed after its layer's backward. On a CPU (DeepSpeed's cpu
    accelerator is a synchronized device) it skips every tensor: the hook runs, nothing moves."""
    from deepspeed.runtime.activation_checkpointing.offload_activations import (
        CheckpointHiddenStatesOffload, _OffloadedTensorRef)

    class SingleRestoreOffload(CheckpointHiddenStatesOffload):
        def _unpack_tensor(self, maybe_ref):
            if isinstance(maybe_ref, _OffloadedTensorRef):
                return self._restore_tensor(maybe_ref.tensor_id, cache=False)
            return maybe_ref

    return SingleRestoreOffload(**options)
