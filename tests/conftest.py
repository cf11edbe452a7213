"""Shared fixtures: the built-in models in the repo-local cache, and a helper that runs the real CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
# Small cuts of the permissively licensed files of ../shared/data (a user's clone has no ../shared); see
# tests/data/SOURCES.md. The Alpaca rows (CC BY-NC) are not among them: tests about those read SHARED_DATA.
TEST_DATA = REPO / "tests" / "data"
needs_shared_alpaca = pytest.mark.skipif(
    not (SHARED_DATA / "alpaca" / "alpaca_tiny.json").is_file(),
    reason="the real Alpaca rows (CC BY-NC 4.0, not kept in tests/data) are only in ../shared/data/alpaca")

# Everything a run caches stays inside the repository (a fresh CI machine has nothing else).
os.environ.setdefault("QLORA_DIST_CACHE", str(REPO / ".cache" / "models"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("HF_DATASETS_CACHE", str(REPO / ".cache" / "hf_datasets"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A rank that aborts (SIGABRT, e.g. a C++ std::terminate at exit) prints where Python was: inside a call, or
# "<no Python frame>" during interpreter finalization.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
# Under `pytest -n N` (make test) N workers share the cores, each starting runs of its own: a process that
# also took every core for its OpenMP threads would fight the other worker's (as ranks do without torchrun's
# OMP_NUM_THREADS=1, see dist._share_cpu_cores). So each worker's processes get their share.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

# Small, fast settings for the tiny random LLaMA; tests add their own on top.
TINY = ["model.path=tiny-llama", "lora.r=8", "lora.alpha=16", "lora.dropout=0.1", "optim.lr=3e-3",
        "train.global_batch_size=8", "train.micro_batch_size=4", "data.num_train=64", "data.num_eval=8",
        "eval.at_end=false", "eval.max_new_tokens=4", "train.seed=7"]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from qlora_dist.model.builtin import resolve_model_path

    return resolve_model_path("tiny-llama")


# The suite's one tiny trained run (4 steps, a checkpoint every 2, all kept), for every test that needs a
# trained adapter or a run's folder: read it, or damage a copy of it, never the folder itself.
TINY_RUN_ARGS = [*TINY, "train.save_steps=2", "checkpoint.keep_last=0"]


def tiny_run_dataset(path: Path, edit: bool = False) -> Path:
    """The tiny run's 64 rows (Alpaca's schema); edit=True changes one output, as a user editing the file."""
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(64)]
    if edit:
        rows[40]["output"] = "forty-one"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(output folder of an uninterrupted 4-step run of the real CLI, its dataset). Under pytest-xdist the
    workers share one run: the first to need it trains it under a file lock, the others read its folder."""
    from filelock import FileLock

    root = _shared_tmp(tmp_path_factory) / "tiny_run"
    with FileLock(str(root) + ".lock"):
        if not (root / "done").is_file():
            root.mkdir(exist_ok=True)
            data = tiny_run_dataset(root / "data.jsonl")
            run_cli("train", *TINY_RUN_ARGS, f"data.dataset={data}", "train.max_steps=4",
                    f"train.output_dir={root / 'run'}", timeout=300)
            (root / "done").touch()
    return root / "run", root / "data.jsonl"


def _shared_tmp(tmp_path_factory) -> Path:
    """A folder every xdist worker of this session sees (the session's base temp without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


# The files whose module-scoped runs take longest (multi-rank launches, a Slurm cluster), run first: under
# `pytest -n 2 --dist loadfile` (make test) a long file started last would leave one core idle at the end.
LONGEST_FIRST = ["test_slurm.py", "test_ranks.py", "test_memory.py", "test_families.py", "test_preempt.py",
                 "test_tracking.py", "test_split_invariance.py", "test_paged_masters.py", "test_zero3_memory.py", "test_dora.py",
                 "test_full_finetune.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def alpaca_file(path: Path, n: int, bad_every: int = 0) -> Path:
    """n generated rows in Alpaca's schema, of varied lengths, two in three with an input; every `bad_every`-th
    lacks its output (a bad row). For tests that need some instruction data, not Alpaca's own rows."""
    lines = []
    for i in range(n):
        row = {"instruction": f"Repeat {i} " * (1 + i % 7), "input": "ctx " * (i % 3), "output": f"{i} " * (1 + i % 11)}
        if bad_every and i % bad_every == bad_every - 1:
            del row["output"]
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m qlora_dist ARGS` in a fresh process, as a user would run it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "qlora_dist", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"qlora-dist {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc: int, *args: str, script: str | None = None, timeout: int = 600,
                 check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m qlora_dist ARGS` (or a test worker script): real ranks over gloo."""
    target = [script] if script else ["-m", "qlora_dist"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *target, *args]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun x{nproc} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def load_adapter_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def held_weight_bytes(model) -> dict[str, int]:
    """One rank's weight bytes by planner item, counted from a loaded model's parameters (16-bit items at
    2 bytes whatever the compute dtype, as the planner plans them)."""
    import bitsandbytes as bnb

    held = {"base_nf4": 0, "quant_constants": 0, "base_16bit": 0}
    for p in model.parameters():
        if isinstance(p, bnb.nn.Params4bit):
            q = p.quant_state
            held["base_nf4"] += p.numel() * p.element_size()
            held["quant_constants"] += sum(t.numel() * t.element_size() for t in
                                           (q.absmax, q.code, q.offset, q.state2.absmax, q.state2.code))
        else:
            held["base_16bit"] += p.numel() * 2
    return held
