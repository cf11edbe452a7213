"""No silent minutes: slow first-time work and evaluations say what they do, on rank 0 only."""
from __future__ import annotations

import fcntl
import os
import threading
import time

import pytest

from qlora_dist.model import builtin


def _fake_writer(out):
    (out / "config.json").write_text("{}")


def test_building_a_builtin_model_is_announced_and_timed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(builtin, "_write_smollm2", _fake_writer)
    builtin.ensure_builtin("smollm2", tmp_path / "smollm2")
    err = capsys.readouterr().err
    assert "converting the embedded SmolLM2-135M-Instruct (GGUF) into a Hugging Face folder once: ~30 s" in err
    assert "smollm2: done in" in err
    builtin.ensure_builtin("smollm2", tmp_path / "smollm2")  # already there: nothing to say
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "1")
    builtin.ensure_builtin("smollm2", tmp_path / "again")
    assert capsys.readouterr().err == ""  # other ranks stay quiet


def test_waiting_for_another_builder_is_announced(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(builtin, "_write_tiny_llama", _fake_writer)
    out = tmp_path / "tiny-llama"
    with open(tmp_path / ".tiny-llama.lock", "w") as lock:  # "another process" holds the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=builtin.ensure_builtin, args=("tiny-llama", out))
        waiter.start()
        time.sleep(0.5)
        out.mkdir()
        _fake_writer(out)
    waiter.join(timeout=10)
    err = capsys.readouterr().err
    assert "waiting for another process that is building" in err and "writing" not in err


@pytest.mark.parametrize("cached", [False, True])
def test_deepspeed_cpu_op_build_is_announced_unless_cached(tmp_path, monkeypatch, capsys, cached):
    from qlora_dist import compat

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    if cached:
        (tmp_path / compat.SHM_COMM_OP).mkdir()
        (tmp_path / compat.SHM_COMM_OP / f"{compat.SHM_COMM_OP}.so").write_bytes(b"")
    assert compat.deepspeed_cpu_op_to_build() == (None if cached else tmp_path / compat.SHM_COMM_OP)


def test_a_load_of_the_deepspeed_op_killed_midway_does_not_hang_the_next_run(tmp_path):
    """torch's FileBaton `lock` left by a process killed while it loaded the op (compat.load_deepspeed_cpu_op):
    without the work-around the next process waits for it forever."""
    import shutil
    import subprocess
    import sys

    from qlora_dist import compat

    compat.load_deepspeed_cpu_op()  # built once per suite, in the repo's cache
    built = compat.deepspeed_cpu_op_dir()
    folder = tmp_path / built.name  # a private copy (times kept: nothing to rebuild) that no other process loads
    shutil.copytree(built, folder, copy_function=shutil.copy2, ignore=shutil.ignore_patterns("lock", ".ninja_lock"))
    baton = folder / "lock"
    baton.touch()  # what a kill -9 inside torch's load leaves
    try:
        done = subprocess.run([sys.executable, "-c", "from qlora_dist import compat; compat.load_deepspeed_cpu_op()"],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    except subprocess.TimeoutExpired:
        pytest.fail("the next load waited for a dead process's lock")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"removing {baton}, left by a process killed" in done.stderr


def test_held_out_eval_and_mmlu_show_a_bar_on_rank_0_only(tiny_model_dir, monkeypatch, capsys):
    from qlora_dist.data.tasks import TASKS, make_split
    from qlora_dist.evaluate import mmlu
    from qlora_dist.evaluate.exact_match import builtin_accuracy
    from qlora_dist.evaluate.generate import load_for_inference
    from qlora_dist import dist

    model, tok = load_for_inference(str(tiny_model_dir), compute_dtype="float32")
    items = make_split(list(TASKS), 1, 1, seed=0)[1][:4]
    capsys.readouterr()
    builtin_accuracy(model, tok, items, batch_size=2, max_new_tokens=2)
    assert "held-out eval" in capsys.readouterr().err
    questions = [mmlu.Question("x", f"Q{i}?\nA. a\nB. b\nC. c\nD. d\nAnswer:", "A", "t") for i in range(4)]
    mmlu.predict(model, tok, questions, batch_size=2)
    assert "MMLU" in capsys.readouterr().err
    monkeypatch.setattr(dist, "is_main", lambda: False)
    builtin_accuracy(model, tok, items, batch_size=2, max_new_tokens=2)
    assert "held-out eval" not in capsys.readouterr().err
