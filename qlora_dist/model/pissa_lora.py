"""A PiSSA adapter as a plain LoRA of the original base (`qlora-dist convert-pissa`): an option, never a default.

A PiSSA adapter (lora.init=pissa) belongs to the residual base W_res = W - s·B0·A0, which qlora-dist rebuilds
from the original weights wherever the adapter is loaded (model/adapter_init.py). For a reader that only
has the original base, peft 0.21.2 converts it at save time (save_pretrained's
path_initial_model_for_weight_conversion): ΔW = s(B·A - B0·A0) = s[B | -B0][A ; A0], a LoRA of twice
the rank (alpha doubled so the scaling stays). On a 16-bit base that is exact: W + ΔW = W_res + s·B·A.
On NF4 it is not: Q(W) + ΔW differs from Q(W_res) + s·B·A by Q(W) - Q(W_res) - s·B0·A0, the difference of
two quantization errors (README "Adapter variants" gives its size on the tiny model).
Here B0, A0 are recomputed from the original weights (as the loader computed them for training), saved as
peft's initial adapter, and peft does the conversion.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from qlora_dist import atomic
from qlora_dist.errors import ConfigError
from qlora_dist.model import adapter_init
from qlora_dist.model.adapter_settings import base_loading
from qlora_dist.model.base import adapter_problems, load_base_for
from qlora_dist.model.builtin import resolve_model_path


def convert(base: str, adapter: str | Path, out: str | Path, compute_dtype: str = "float32") -> Path:
    """Write `adapter` (a PiSSA adapter of `base`) into `out` as a plain LoRA of the original base, r doubled.
    Every input problem is raised before a weight is read."""
    import peft
    from safetensors.torch import load_file

    adapter, out = Path(adapter), Path(out)
    problems = atomic.output_problems(out, "--out", folder=True, empty=True) + adapter_problems(adapter, base)
    if problems:
        raise ConfigError(problems)
    loading = base_loading(adapter, compute_dtype=compute_dtype)
    if loading.init is None or loading.init.method != "pissa":
        raise ConfigError([f"--adapter: {adapter} is not a PiSSA adapter (its qlora_dist.json has no lora_init=pissa)"])
    residual = load_base_for(resolve_model_path(base), loading)  # the start (B0, A0) kept on each layer
    model = peft.get_peft_model(residual, peft.LoraConfig.from_pretrained(str(adapter)))
    adapter_init.place_init_weights(model)
    with tempfile.TemporaryDirectory() as tmp, atomic.folder(out) as done:
        initial = Path(tmp) / "initial"
        model.save_pretrained(str(initial))  # init_lora_weights=true: peft's load does not re-run PiSSA
        peft.set_peft_model_state_dict(model, load_file(str(adapter / "adapter_model.safetensors")))
        model.save_pretrained(str(done), path_initial_model_for_weight_conversion=str(initial))
    return out
