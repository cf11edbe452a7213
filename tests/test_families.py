"""Model families beyond LLaMA-1 (issue 16), each as a tiny random model built from transformers' own config
class (model/builtin.py TINY_FAMILIES: `model.path=tiny:<family>`), on CPU: NF4 through from_pretrained and
through the layer-wise loader, packing, MMLU letters, generate, a 2-rank ZeRO-3 run per family in ONE launch
(export, the seed-style reload, merge), the planner to the byte, the preflight's refusals, the size-class
presets. `pytest -s` prints the measured logit agreement per family."""
from __future__ import annotations

import functools
import json

import pytest
import torch

from conftest import REPO, TINY, held_weight_bytes, load_adapter_tensors, run_torchrun
from qlora_dist import memory
from qlora_dist.model.builtin import TINY_FAMILIES, resolve_model_path

FAMILIES = list(TINY_FAMILIES)
SEPARATE = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
TARGETS = {f: SEPARATE for f in FAMILIES} | {"phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}}
# Three optimizer steps on 2 ranks (micro batch 2, no accumulation), dropout off: the trained logits are a
# pure function of the adapter.
ZERO3_ARGS = [*TINY, "lora.dropout=0", "train.global_batch_size=4", "train.micro_batch_size=2", "data.num_train=8",
              "data.num_eval=4", "train.max_steps=3", "train.save_steps=3", "dist.ds_config=zero3",
              "model.compute_dtype=bfloat16"]  # the planner's bytes and the seed's reload are bf16


def _raw(t: torch.Tensor) -> torch.Tensor:
    """Bytes of a tensor: packed NF4 in bf16 storage holds bit patterns that read as NaN."""
    return t.contiguous().view(torch.uint8) if t.dim() else t


@functools.cache
def _base(family: str):
    """The family's tiny model in NF4 through transformers' from_pretrained (fp32 compute: exact comparisons)."""
    from qlora_dist.model.base import load_base, load_tokenizer

    path = resolve_model_path(f"tiny:{family}")
    return load_base(path, compute_dtype="float32").eval(), load_tokenizer(path)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(4, 500, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_loader_quantizes_like_from_pretrained(family):
    import bitsandbytes as bnb
    from transformers import AutoConfig

    from qlora_dist.model.loader import SafetensorsSource, load_layerwise

    path = resolve_model_path(f"tiny:{family}")
    hf, _ = _base(family)
    ours = load_layerwise(AutoConfig.from_pretrained(path), SafetensorsSource(path), compute_dtype="float32")
    assert type(ours) is type(hf)
    a, b = hf.state_dict(), ours.state_dict()
    assert set(a) == set(b)
    assert [k for k in a if not torch.equal(_raw(a[k]), _raw(b[k]))] == []  # the same packed NF4 bytes
    quantized = {n.rsplit(".", 1)[-1] for n, m in ours.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == TARGETS[family]  # every linear layer but lm_head, biases included (qwen2)
    ids = _ids(12, 0)[None]
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, ours(input_ids=ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_equals_unpacked_rows(family):
    """Two examples in one row with position ids restarting at 0 (data.packing): each example's logits are
    those it gets alone (the attention is block-diagonal), for every family's attention and rope."""
    model, _ = _base(family)
    a, b = _ids(9, 1), _ids(6, 2)
    with torch.no_grad():
        alone = [model(input_ids=x[None], use_cache=False).logits[0] for x in (a, b)]
        packed = model(input_ids=torch.cat([a, b])[None], use_cache=False,  # as training: no KV cache
                       position_ids=torch.cat([torch.arange(9), torch.arange(6)])[None]).logits[0]
    gap = max((packed[:9] - alone[0]).abs().max(), (packed[9:] - alone[1]).abs().max())
    assert gap < 1e-4 * alone[0].abs().max(), (family, float(gap))


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_paths_apply_or_decline_per_family(family):
    """The fused loss equals transformers' loss where it applies, and steps aside for Gemma-2's final logit
    soft-capping; the compiled kernels (LLaMA's modules) leave the other families alone."""
    from qlora_dist.model import fastpath

    model, _ = _base(family)
    refusal = fastpath.fused_loss_refusal(model)
    if family == "gemma2":
        assert "final_logit_softcapping=30.0" in refusal and not fastpath.install_fused_loss(model)
    else:
        assert refusal is None
        ids = _ids(10, 3)[None]
        with torch.no_grad():
            want = model(input_ids=ids, labels=ids, use_cache=False).loss
            assert fastpath.install_fused_loss(model)
            try:
                got = model(input_ids=ids, labels=ids, use_cache=False).loss
            finally:
                fastpath.set_fused_loss(model, False)  # the cached model stays transformers' own
        assert abs(float(got - want)) < 1e-5 * float(want)
    if not family.startswith("llama"):
        assert fastpath.install_compiled_kernels(model) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_mmlu_letters_and_generate(family):
    from qlora_dist.evaluate import mmlu
    from qlora_dist.evaluate.generate import generate_texts

    model, tok = _base(family)
    questions = [mmlu.Question("math", p, "B", "test") for p in
                 ("What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", "Sort 3 1 2.\nA. 1 2 3\nB. 3 2 1\nC. 2 1 3\nD. 1 3 2\nAnswer:")]
    predicted = mmlu.predict(model, tok, questions, batch_size=2)  # one left-padded batch
    _, letters = mmlu.letter_tokens(tok)
    for q, (letter, loss) in zip(questions, predicted):
        row = mmlu._encode(tok, [q])[0]
        with torch.no_grad():
            last = model(input_ids=torch.tensor([row])).logits[0, -1].float()
        assert letter == mmlu.CHOICES[int(last[letters].argmax())]  # as the question scored alone, unpadded
        assert abs(loss - float(torch.nn.functional.cross_entropy(last[None], torch.tensor([letters[1]])))) < 1e-3
    prompts = ["### Human: Sort 3 1 2. ### Assistant:", "### Human: Hi ### Assistant:"]
    together = generate_texts(model, tok, prompts, max_new_tokens=4)  # the second left-padded; KV cache
    assert together[1] == generate_texts(model, tok, prompts[1:], max_new_tokens=4)[0] and together[1]


def test_llama3_without_pad_token_keeps_the_eos_label():
    """Llama-3 ships no pad token: load_tokenizer pads with EOS, and padding is masked by length, so an
    example's own EOS label is still learned while the padding after it is not."""
    from qlora_dist.data.batches import IGNORE_INDEX, collate, tokenize
    from qlora_dist.data.formats import Example
    from qlora_dist.model.base import load_tokenizer

    path = resolve_model_path("tiny:llama3")
    assert json.loads((path / "tokenizer_config.json").read_text()).get("pad_token") is None  # as Llama-3
    tok = load_tokenizer(path)
    assert tok.pad_token_id == tok.eos_token_id
    short, long = (tokenize(Example("### Human: Hi ### Assistant:", t), tok, 64, 64, False) for t in (" 4", " 1 2 3 4 5"))
    batch = collate([short, long], tok.pad_token_id)
    n = len(short.input_ids)
    assert batch["labels"][0, n - 1] == tok.eos_token_id  # the real EOS: learned
    assert (batch["input_ids"][0, n:] == tok.eos_token_id).all() and (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0, n:].sum() == 0


# ------------------------------------------------------------------------------------ 2 ranks, ZeRO-3
@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory):
    """ONE torchrun launch of 2 ranks that trains every family in turn (tests/workers/families_zero3.py)."""
    out = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        resolve_model_path(f"tiny:{family}")  # built before the ranks start (they would wait on the lock)
    run_torchrun(2, str(out), ",".join(FAMILIES), *ZERO3_ARGS, timeout=400,
                 script=str(REPO / "tests" / "workers" / "families_zero3.py"))
    return out


def _seed_reload(family: str, adapter):
    """The seed's loading code: from_pretrained in NF4 (bf16 compute) + PeftModel.from_pretrained."""
    from test_adapter_logits import _seed_loading_code

    from qlora_dist import compat

    model = _seed_loading_code(resolve_model_path(f"tiny:{family}"), adapter).eval()
    compat.disable_cpu_weight_repacking(model)
    return model


def _agreement(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest logit difference over real tokens, relative to the largest logit."""
    return float((got - want)[mask].abs().max() / want[mask].abs().max())


@pytest.mark.slow
def test_zero3_trains_exports_and_reloads_every_family(zero3_runs):
    rows = []
    for family in FAMILIES:
        out = zero3_runs / family
        result = json.loads((out / "result.json").read_text())
        assert (result["world_size"], result["zero_stage"]) == (2, 3)
        # The run saved once (at its last step), gathering the LoRA weights once and not one byte of the base.
        assert result["gathered_bytes"] == [result["lora_bytes"]]
        for held in result["held"]:  # each rank's share of the base, to the byte, as planned
            assert held == result["planned"], (family, held, result["planned"])
        settings = json.loads((out / "adapter_model" / "adapter_config.json").read_text())
        assert set(settings["target_modules"]) == TARGETS[family]
        tensors = load_adapter_tensors(out / "adapter_model")
        assert len(tensors) == 2 * 2 * len(TARGETS[family])  # A and B, every linear layer of 2 layers
        assert all(t.abs().sum() > 0 for n, t in tensors.items() if "lora_B" in n)  # trained
        saved = torch.load(out / "trained_logits.pt")
        batch, mask = saved["batch"], saved["batch"]["attention_mask"].bool()
        model = _seed_reload(family, out / "adapter_model")
        with torch.no_grad():
            got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            with model.disable_adapter():
                base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        rows.append((family, _agreement(got, saved["logits"], mask), _agreement(base, saved["logits"], mask)))
    print("\nfamily   reloaded vs trained logits   base vs trained (what the adapter changed)")
    for family, agree, changed in rows:
        print(f"{family:<8} {agree:>14.2e}             {changed:>10.2e}")
    # bf16 end to end on both sides (the ZeRO-3 engine's model, a fresh from_pretrained + peft): rounding noise
    # up to ~1% of the largest logit (tests/test_ranks.py allows the same), against an adapter that moved the
    # logits 40-200 times more.
    for family, agree, changed in rows:
        assert agree <= 0.02 and changed > 20 * agree, (family, agree, changed)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "gemma2", "phi3"])
def test_merge_reproduces_the_adapter(zero3_runs, family, tmp_path):
    """merge: the dequantized NF4 base + LoRA, a plain 16-bit folder, gives the trained logits."""
    from transformers import AutoModelForCausalLM

    from qlora_dist.model.merge import merge

    out = merge(f"tiny:{family}", zero3_runs / family / "adapter_model", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    saved = torch.load(zero3_runs / family / "trained_logits.pt")
    batch = saved["batch"]
    with torch.no_grad():
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    agree = _agreement(got, saved["logits"], batch["attention_mask"].bool())
    print(f"\n{family}: merged vs trained logits {agree:.2e}")
    assert agree <= 0.02


# ----------------------------------------------------------------------------------------- the planner
# Published sizes (the models' config.json on the Hugging Face hub): meta-llama/Meta-Llama-3-70B,
# Qwen/Qwen2.5-72B, mistralai/Mistral-7B-v0.1.
PUBLISHED = {
    "llama3-70b": {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                   "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256,
                   "tie_word_embeddings": False, "rope_theta": 500000.0, "max_position_embeddings": 8192},
    "qwen2.5-72b": {"model_type": "qwen2", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "intermediate_size": 29568, "vocab_size": 152064,
                    "tie_word_embeddings": False, "rope_theta": 1000000.0, "max_position_embeddings": 32768},
    "mistral-7b": {"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
                   "tie_word_embeddings": False, "rope_theta": 10000.0, "max_position_embeddings": 32768},
}
WORLD, R = 8, 64


def _config_folder(tmp_path, name: str):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(PUBLISHED[name]))
    return folder


def _hand_count(c: dict) -> dict[str, int]:
    """One ZeRO-3 rank's bytes of 8, counted from the tensor list of the published architecture: 7 NF4
    linear layers a layer (4 bits a weight in bf16 storage, each parameter split in 8 and rounded up),
    their quantization constants whole on every rank (1 byte a 64-weight block, 4 bytes per 256 blocks,
    a 16-entry NF4 code, a 256-entry fp32 code and an offset), embeddings, lm_head, 2 norms a layer and
    the final norm in bf16 (Qwen2 adds q, k, v biases), LoRA r=64 A and B of each linear layer in bf16."""
    h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    d = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * d
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down

    def part(numel: int) -> int:  # one rank's slice of a parameter: split in WORLD, rounded up
        return -(-numel // WORLD)

    nf4 = n * sum(part(a * b // 4) * 2 for a, b in linears)
    consts = n * sum(a * b // 64 + -(-(a * b // 64) // 256) * 4 + 16 * 4 + 256 * 4 + 4 for a, b in linears)
    per_layer16 = [h, h] + ([h, kv, kv] if c["model_type"] == "qwen2" else [])
    base16 = 2 * part(c["vocab_size"] * h) * 2 + n * sum(part(x) * 2 for x in per_layer16) + part(h) * 2
    lora = n * sum(part(R * a) * 2 + part(b * R) * 2 for a, b in linears)
    return {"base_nf4": nf4, "quant_constants": consts, "base_16bit": base16, "lora_weights": lora}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_plan_of_published_shapes_equals_a_hand_count(tmp_path, capsys, name):
    from qlora_dist import cli

    folder = _config_folder(tmp_path, name)
    args = ["plan", f"model.path={folder}", "dist.ds_config=zero3", f"lora.r={R}", "--world-size", str(WORLD)]
    assert cli.main(args) == 0
    table = capsys.readouterr().out
    with capsys.disabled():
        print(f"\n{name}:\n{table}")
    assert f"{PUBLISHED[name]['num_hidden_layers']} layers x {PUBLISHED[name]['hidden_size']} hidden" in table
    assert f"ZeRO-3, {WORLD} rank(s)" in table
    assert cli.main([*args, "--json"]) == 0
    per_rank = json.loads(capsys.readouterr().out)["per_rank_bytes"]
    for item, count in _hand_count(PUBLISHED[name]).items():
        assert per_rank[item] == count, (name, item, per_rank[item], count)


@pytest.mark.parametrize("family", FAMILIES)
def test_planned_weights_equal_the_real_tensors(family):
    """One rank, whole model: the planner's weight and LoRA element counts from config.json alone against the
    loaded model (the 2-rank ZeRO-3 shares are checked in test_zero3_trains_exports_and_reloads_every_family)."""
    from qlora_dist.config import load_config
    from qlora_dist.model.base import add_lora

    model, _ = _base(family)
    shape = memory.Shape.from_folder(resolve_model_path(f"tiny:{family}"))
    planned = memory.weight_items(memory.Setup(shape=shape, lora_r=8))
    assert held_weight_bytes(model) == planned  # 16-bit items as planned (the model is fp32 here for exactness)
    assert shape.parameters() == sum(p.quant_state.shape.numel() if hasattr(p, "quant_state") else p.numel()
                                     for p in model.parameters())
    lora = add_lora(_base.__wrapped__(family)[0], load_config(overrides=["lora.r=8"]), 0)
    assert sorted(p.numel() for n, p in lora.named_parameters() if "lora_" in n) == sorted(
        memory.lora_numels(memory.Setup(shape=shape, lora_r=8)))


# ------------------------------------------------------------------------------ preflight and presets
def test_mixture_of_experts_is_refused_in_the_preflight(tmp_path, capsys, tiny_model_dir):
    """A tiny Mixtral folder (config, tokenizer, weights all valid): `check` refuses it up front, saying why
    and what would work, before any weight is read."""
    import shutil

    from transformers import MixtralConfig, MixtralForCausalLM

    from qlora_dist import cli

    folder = tmp_path / "tiny-mixtral"
    config = MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    MixtralForCausalLM(config).save_pretrained(folder)
    shutil.copy(tiny_model_dir / "tokenizer.json", folder)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", folder)
    assert cli.main(["check", f"model.path={folder}", f"train.output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert f"model.path: {folder} holds a 'mixtral' model: a mixture of 4 experts" in err
    assert "bitsandbytes does not quantize to NF4" in err and "llama, mistral, qwen2, qwen3, gemma2, phi3" in err
    assert cli.main(["plan", f"model.path={folder}"]) == 2  # no plan of a model that cannot be trained either
    assert "a mixture of 4 experts" in capsys.readouterr().err
    dense = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if "expert" not in k}
    (folder / "config.json").write_text(json.dumps({**dense, "model_type": "gpt_neox"}))
    assert cli.main(["check", f"model.path={folder}", f"train.output_dir={tmp_path / 'out'}"]) == 2
    assert "not a tested family; qlora-dist trains model_type llama, mistral" in capsys.readouterr().err


def test_a_dataset_preset_takes_the_size_class_from_the_model(tmp_path, capsys):
    from qlora_dist.run_plan import load_run_config as load_config  # a dataset alone: resolved from the model
    from qlora_dist.errors import ConfigError
    from qlora_dist.recipe import PRESETS

    big = load_config(preset="oasst1", overrides=[f"model.path={_config_folder(tmp_path, 'llama3-70b')}"])
    assert big.preset == "65b-oasst1" and (big.optim.lr, big.lora.dropout) == (1e-4, 0.05)
    assert "70.55B parameters; nearest size class 65b: preset 65b-oasst1" in capsys.readouterr().err
    small = load_config(preset="longform", overrides=[f"model.path={_config_folder(tmp_path, 'mistral-7b')}"])
    assert small.preset == "7b-longform" and small.train.max_steps == PRESETS["7b-longform"]["train.max_steps"]
    with pytest.raises(ConfigError, match="takes its size class .* from the model's parameter count: set model.path"):
        load_config(preset="oasst1")


def _saved_bytes_per_token_per_layer(family: str, seq: int = 64) -> tuple[float, int]:
    """(what autograd really saves for one decoder layer per token, measured as tests/test_memory.py
    measures LLaMA; the plan's figure) for the family's modules at hidden 256, 4 heads of 128 (query width
    apart from hidden), LoRA dropout on."""
    import transformers

    from test_memory import saved_bytes_per_token_per_layer

    class_name, own, _ = TINY_FAMILIES[family]
    sizes = {**own, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "head_dim": 128,
             "vocab_size": 1000, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
             **({"query_pre_attn_scalar": 128} if family == "gemma2" else {})}
    make = lambda layers: getattr(transformers, class_name)(**sizes, num_hidden_layers=layers)  # noqa: E731
    shape = memory.Shape.from_hf(make(1))
    planned = memory.layer_activation_bytes_per_token(memory.Setup(shape=shape, seq_len=seq, lora_dropout=True))
    return saved_bytes_per_token_per_layer(make, 1000, 0.1, seq), planned


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "gemma2", "phi3"])  # LLaMA's layout: tests/test_memory.py
def test_activation_model_per_family_matches_what_autograd_saves(family):
    measured, planned = _saved_bytes_per_token_per_layer(family)
    print(f"\n{family}: activations per token per layer planned {planned}, measured {measured:.0f}")
    assert abs(planned - measured) <= 0.02 * measured, (family, planned, measured)


def test_all_linear_means_each_familys_own_layers_when_starting_from_an_adapter():
    """lora.target_modules=all-linear set by the user agrees with an adapter that lists the family's linear
    layers (Phi-3's fused qkv_proj/gate_up_proj), and not with a LLaMA list on Phi-3."""
    from qlora_dist.model.init_adapter import _same

    assert _same("lora.target_modules", ["all-linear"], sorted(TARGETS["phi3"]), "tiny:phi3")
    assert not _same("lora.target_modules", ["all-linear"], sorted(SEPARATE), "tiny:phi3")
    assert _same("lora.target_modules", sorted(SEPARATE), ["all-linear"], "tiny:llama3")
