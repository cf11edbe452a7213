"""Checkpoints that can be trusted: manifests, fallback to the newest intact checkpoint, nothing
non-finite written or resumed, no code run from a checkpoint folder, clear faults (disk full, lowered
max_steps, changed data, truncated adapters). The suite's one tiny run (conftest.tiny_run: 4 steps, a
checkpoint every 2, one rank) is trained once; each case damages a copy of its folder."""
from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY, TINY_RUN_ARGS, run_cli, tiny_run_dataset
from qlora_dist.precision import dtype_name

pytestmark = pytest.mark.slow  # every case works on the folder of one real training run

ARGS = TINY_RUN_ARGS
# DeepSpeed names the file by the run's dtype: bf16_ on a CPU with native bf16, none where `auto` is fp32
OPTIM = f"engine/{'bf16_' if dtype_name('auto') == 'bfloat16' else ''}zero_pp_rank_0_mp_rank_00_optim_states.pt"
ADAPTER = "adapter_model/adapter_model.safetensors"


@pytest.fixture(scope="module")
def trained(tiny_run) -> tuple[Path, Path]:
    """(output folder of an uninterrupted 4-step run, its dataset)."""
    return tiny_run


def _copy(trained, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained[0], out, ignore=shutil.ignore_patterns(".lock"))
    return out


def _cfg(out: Path, data: Path, *extra: str):
    from qlora_dist.config import load_config

    return load_config(overrides=[*ARGS, f"data.dataset={data}", "train.max_steps=4", f"train.output_dir={out}",
                                  *extra])


def _checkpointer(out: Path, data: Path, *extra: str):
    from qlora_dist.paths import RunPaths
    from qlora_dist.train.checkpoint import Checkpointer

    return Checkpointer(RunPaths(out), _cfg(out, data, *extra), {}, rank=0, world_size=1)


def _remanifest(ckpt: Path) -> None:
    """Rewrite the manifest after planting damage: what the manifest cannot catch must still be caught."""
    from qlora_dist.train import manifest

    manifest.write(ckpt)


class Evil:
    """A pickle that runs code when unpickled: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_nan_master(ckpt: Path) -> None:
    from qlora_dist import compat

    state = compat.safe_torch_load(ckpt / OPTIM)
    with torch.no_grad():
        state["optimizer_state_dict"]["single_partition_of_fp32_groups"][0][3] = float("nan")
    torch.save(state, ckpt / OPTIM)
    _remanifest(ckpt)


# -------------------------------------------------------------------------------------------- end to end
def test_fallback_resume_is_bitwise_equal_to_the_uninterrupted_run(trained, tmp_path):
    """K2 + K7: the newest checkpoint's optimizer states truncated and the final adapter emptied: the rerun
    names the file, sets checkpoint-4 aside, resumes checkpoint-2 and ends bitwise where the uninterrupted
    run ended."""
    out = _copy(trained, tmp_path)
    with (out / "checkpoint-4" / OPTIM).open("r+b") as f:
        f.truncate(1000)
    (out / ADAPTER).write_bytes(b"")
    proc = run_cli("train", *ARGS, f"data.dataset={trained[1]}", "train.max_steps=4", f"train.output_dir={out}",
                   timeout=120)
    assert f"checkpoint-4 is damaged ({OPTIM}: 1,000 bytes" in proc.stderr
    assert "resuming from" in proc.stderr and "checkpoint-2 (step 2" in proc.stderr
    assert (out / "checkpoint-4.damaged" / OPTIM).stat().st_size == 1000  # kept for inspection
    assert (out / ADAPTER).read_bytes() == (trained[0] / ADAPTER).read_bytes()
    assert (out / "checkpoint-4" / ADAPTER).read_bytes() == (trained[0] / "checkpoint-4" / ADAPTER).read_bytes()
    from qlora_dist.train.checkpoint import verify_folder

    assert [(name, ok) for name, ok, _ in verify_folder(out)] == [
        ("checkpoint-2", True), ("checkpoint-4", True), ("adapter_model", True)]


def test_changed_data_is_refused_and_content_not_path_decides(trained, tmp_path, capsys):
    """K14: an edited dataset stops the resume before the model loads; the fingerprint is of the rows'
    content (the same file at another path gives the same one, which the run recorded)."""
    out = _copy(trained, tmp_path)
    edited = tiny_run_dataset(tmp_path / "data.jsonl", edit=True)
    proc = run_cli("train", *ARGS, f"data.dataset={edited}", "train.max_steps=6", f"train.output_dir={out}",
                   check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "data.dataset: the training data changed since checkpoint-4" in proc.stderr
    assert "loading tiny-llama" not in proc.stderr  # refused before the model

    from qlora_dist.data.corpus import cached_rows
    from qlora_dist import dist
    from qlora_dist.model.base import load_tokenizer

    copy = shutil.copy(trained[1], tmp_path / "scratch-copy.jsonl")
    tokenizer, info = load_tokenizer("tiny-llama"), dist.read_env()
    shas = [cached_rows(_cfg(out, d), tokenizer, info, tmp_path / "cache")[0].content_sha256()
            for d in (trained[1], Path(copy), edited)]
    recorded = json.loads((trained[0] / "checkpoint-4" / "progress.json").read_text())["data_sha256"]
    assert shas[0] == shas[1] == recorded != shas[2]

    env = out / "checkpoint-4" / "environment.json"
    env.write_text(json.dumps({**json.loads(env.read_text()), "torch": "0.0", "hostname": "elsewhere"}))
    _remanifest(out / "checkpoint-4")
    ckpt = _checkpointer(out, Path(copy))  # another path, same content: resumable
    assert ckpt.recover() == out / "checkpoint-4"
    capsys.readouterr()
    ckpt.check_data(shas[1])
    log = capsys.readouterr().err
    assert f"saved with other software or hardware: torch: 0.0 -> {torch.__version__}" in log and "host" not in log
    allowed = _checkpointer(out, edited, "data.allow_changed=true")
    allowed.recover()
    allowed.check_data(shas[2])  # logged, not refused
    assert "the training data changed since checkpoint-4" in capsys.readouterr().err


def test_disk_full_names_folder_keeps_previous_and_removes_partial(tmp_path, tiny_model_dir):
    """D1 on a real 4 MB tmpfs: room for the first checkpoint, not the second."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the disk-full mapping is unit-tested below")
    try:
        (mnt / "filler").write_bytes(b"\0" * (4 * 2**20 - 600 * 2**10))
        out = mnt / "run"
        proc = run_cli("train", *TINY, "train.max_steps=2", "train.save_steps=1", f"train.output_dir={out}",
                       check=False, timeout=120)
        assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert f"no space left on the device of {out} while saving checkpoint-2" in line, line
        assert "bytes, " in line and "are free" in line and "checkpoint-1 stays the newest" in line
        assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
        from qlora_dist.train.checkpoint import verdict

        assert verdict(out / "checkpoint-1") == "ok"
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_generate_with_a_truncated_adapter_is_one_line(trained, tmp_path):
    """G2."""
    adapter = tmp_path / "adapter"
    shutil.copytree(trained[0] / "adapter_model", adapter)
    with (adapter / "adapter_model.safetensors").open("r+b") as f:
        f.truncate(20000)
    proc = run_cli("generate", "--base", "tiny-llama", "--adapter", str(adapter), "--prompt", "hi", check=False,
                   timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{adapter / 'adapter_model.safetensors'}: 20,000 bytes" in proc.stderr


# -------------------------------------------------------------------------------------------- in process
DAMAGE = {  # case -> (how to damage checkpoint-4, words the log must contain)
    "K3 garbage progress.json": (lambda c: (c / "progress.json").write_text("{not json"), "progress.json: "),
    "K5 empty rng file": (lambda c: (c / "rng" / "rank-0.safetensors").write_bytes(b""), "rng/rank-0.safetensors: 0 bytes"),
    "K7 truncated adapter": (lambda c: (c / ADAPTER).write_bytes((c / ADAPTER).read_bytes()[:5000]), f"{ADAPTER}: 5,000"),
    "bit flip, same size": (lambda c: (c / "config.yaml").write_text((c / "config.yaml").read_text().replace("7", "8")),
                            "config.yaml: content differs from the manifest"),
    "K6 NaN in fp32 master": (_plant_nan_master, "single_partition_of_fp32_groups[0]: NaN or Inf values"),
    "garbage manifest": (lambda c: (c / "manifest.json").write_text("[]"), "manifest.json: not a valid manifest"),
}


def test_damaged_newest_checkpoint_is_set_aside_and_the_older_one_resumed(trained, tmp_path, capsys):
    for case, (damage, words) in DAMAGE.items():
        out = _copy(trained, tmp_path / case.replace(" ", "_"))
        damage(out / "checkpoint-4")
        ckpt = _checkpointer(out, trained[1])
        assert ckpt.recover() == out / "checkpoint-2", case
        log = capsys.readouterr().err
        assert "checkpoint-4 is damaged (" in log and words in log, (case, log)
        assert (out / "checkpoint-4.damaged").is_dir() and not (out / "checkpoint-4").exists(), case
        assert ckpt.completed() is None, case  # resumes from 2: a finished folder is not "completed" any more


def test_no_intact_checkpoint_names_every_damaged_file(trained, tmp_path):
    from qlora_dist.errors import ConfigError

    out = _copy(trained, tmp_path)
    for step in (2, 4):
        (out / f"checkpoint-{step}" / "progress.json").write_text("garbage")
    with pytest.raises(ConfigError) as err:
        _checkpointer(out, trained[1]).recover()
    assert "no intact checkpoint to resume" in str(err.value)
    assert "checkpoint-2/progress.json" in str(err.value) and "checkpoint-4/progress.json" in str(err.value)
    assert (out / "checkpoint-4").is_dir()  # nothing moved when nothing can be resumed


def test_final_adapter_damaged_is_not_completed_and_newest_good(trained, tmp_path):
    """K7 (finished folder), and newest_good(): newest checkpoint that verifies with finite tensors."""
    out = _copy(trained, tmp_path)
    ckpt = _checkpointer(out, trained[1])
    ckpt.recover()
    assert ckpt.completed()["step"] == 4
    (out / ADAPTER).write_bytes(b"")
    assert ckpt.completed() is None
    assert ckpt.newest_good() == out / "checkpoint-4"
    _plant_nan_master(out / "checkpoint-4")
    assert ckpt.newest_good() == out / "checkpoint-2"


def test_lowered_max_steps_names_both_numbers(trained, tmp_path):
    """K13: in the preflight (before loading) and in the run itself."""
    from qlora_dist import preflight
    from qlora_dist.errors import ConfigError

    out = _copy(trained, tmp_path)
    problems = preflight.run(_cfg(out, trained[1], "train.max_steps=2"), 1).problems
    assert any("train.max_steps: 2 is below the 4 steps" in p for p in problems), problems
    with pytest.raises(ConfigError, match="train.max_steps: 2 is below the 4 steps"):
        _checkpointer(out, trained[1], "train.max_steps=2").recover()


def test_no_code_runs_from_checkpoint_files(trained, tmp_path):
    """X1: a crafted pickle as a legacy rng/rank-0.pt, as DeepSpeed's optimizer states (verified by a
    rewritten manifest), through the engine's checkpoint loader and through reshard: never executed."""
    from qlora_dist import compat
    from qlora_dist.errors import RunFault
    from qlora_dist.train import checkpoint, reshard

    out, marker, torch_load = _copy(trained, tmp_path), tmp_path / "pwned", torch.load
    ckpt = out / "checkpoint-4"
    (ckpt / "rng" / "rank-0.safetensors").unlink()
    torch.save({"torch": Evil(marker)}, ckpt / "rng" / "rank-0.pt")
    with pytest.raises(RunFault, match="rng: cannot read rank 0's RNG state"):
        checkpoint._restore_rng(ckpt, 0)
    torch.save({"optimizer_state_dict": Evil(marker)}, ckpt / OPTIM)
    _remanifest(ckpt)
    assert checkpoint.checkpoint_problem(ckpt, deep=True).startswith(f"{OPTIM}: unreadable as plain tensors")
    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace())
    compat.load_engine_files_safely(engine)
    with pytest.raises(Exception, match="Unsupported global: GLOBAL io.open"):
        engine.checkpoint_engine.load(str(ckpt / OPTIM))
    shutil.copy(trained[0] / "checkpoint-4" / OPTIM, ckpt / OPTIM)  # reshard reads these first, then:
    torch.save({"buffer_names": Evil(marker)}, ckpt / "engine" / "mp_rank_00_model_states.pt")
    with pytest.raises(Exception, match="Unsupported global: GLOBAL io.open"):
        reshard.merged_lora_state(ckpt / "engine")  # inside DeepSpeed's zero_to_fp32 helpers
    assert not marker.exists()
    assert torch.load is torch_load  # the weights-only patch was undone


def test_non_finite_weights_are_never_saved(trained, tmp_path):
    from qlora_dist.errors import RunFault

    out = _copy(trained, tmp_path)
    module = torch.nn.Linear(2, 2)
    engine = SimpleNamespace(module=module, optimizer=SimpleNamespace(
        single_partition_of_fp32_groups=[torch.tensor([0.0, float("inf")])]))
    ckpt = _checkpointer(out, trained[1])
    from qlora_dist.train.checkpoint import Progress

    with pytest.raises(RunFault, match=r"step 6: non-finite values \(NaN/Inf\) in fp32 master weights \(parameter "
                                       r"group 0\); not saving checkpoint-6, checkpoint-4 stays the newest"):
        ckpt.save(engine, Progress(6, 48, 0.3, 7, 1, 8, 2), zero_stage=2)
    with torch.no_grad():
        module.weight[0, 0] = float("nan")
    with pytest.raises(RunFault, match="in LoRA weight weight;"):
        ckpt.save(engine, Progress(6, 48, 0.3, 7, 1, 8, 2), zero_stage=2)
    assert not list(out.glob(".tmp-*")) and not (out / "checkpoint-6").exists()


def test_disk_full_errors_are_recognized():
    from qlora_dist import compat

    assert compat.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert compat.is_disk_full(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64"))
    assert not compat.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not compat.is_disk_full(RuntimeError("shape mismatch"))


def test_verify_command_verdicts_and_exit_codes(trained, tmp_path, capsys):
    from qlora_dist.cli import main

    out = _copy(trained, tmp_path)
    assert main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == ["checkpoint-2: ok", "checkpoint-4: ok",
                                                    "adapter_model: ok (matches checkpoint-4)"]
    (out / "checkpoint-2" / ADAPTER).write_bytes(b"x")
    _plant_nan_master(out / "checkpoint-4")
    (out / ADAPTER).write_bytes(b"")
    assert main(["verify", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    size = json.loads((out / "checkpoint-2" / "manifest.json").read_text())["files"][ADAPTER]["bytes"]
    assert lines[0] == f"checkpoint-2: damaged: {ADAPTER}: 1 bytes, the manifest says {size:,} (truncated or overwritten)"
    assert lines[1].startswith(f"checkpoint-4: non-finite: {OPTIM}:optimizer_state_dict.single_partition_of_fp32")
    assert lines[2].startswith("adapter_model: damaged: ") and "differs from checkpoint-4" in lines[2]
    assert main(["verify", str(tmp_path / "nothing")]) == 2


def test_a_key_newer_than_the_checkpoint_is_named_as_such():
    """A checkpoint of an older qlora-dist lacks train.loss_normalization (its loss was a mean per
    micro-batch): resuming it is refused, and the message says why rather than 'checkpoint has None'."""
    from qlora_dist.config import load_config
    from qlora_dist.train.checkpoint import config_differences

    cfg = load_config(overrides=list(TINY))
    saved = cfg.to_dict()
    del saved["train"]["loss_normalization"]
    # keys whose default is what older versions did (no held-out rows, the guanaco template) resume at it
    del saved["data"]["eval_size"], saved["data"]["chat_template"]
    assert config_differences(saved, cfg) == [
        "train.loss_normalization: not in the checkpoint (saved by a qlora-dist before the key existed), "
        "this run has 'sequence'"]
    held_out = load_config(overrides=[*TINY, "data.eval_size=4"])
    assert config_differences(saved, held_out)[0] == "data.eval_size: checkpoint has 0, this run has 4"
