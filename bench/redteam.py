"""The red-team of bad inputs and faults (shared/redteam/2026-12-01.md), rerun as a script: each case runs
the real CLI in fresh processes (tiny LLaMA, fp32 compute, CPU), checks what a demanding user expects, and
prints one row: id, what happened, verdict (OK: the expected outcome, no traceback; POOR: a traceback or an
unclear/late error; BAD: a hang, lost work or a silent wrong result).

    python bench/redteam.py [--only K2,K3] [--json results.json]

Not a test (minutes, and some cases need root for a tmpfs or read-only folder); tests/ hold the asserting
version of each case. Every subprocess has a timeout: a hang is a verdict, not a stuck script.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "tests"))
from conftest import TINY  # noqa: E402  (also sets the repo-local caches)

BASE = [*TINY, "model.compute_dtype=float32", "lora.dropout=0.0"]
ONE_LINE = "qlora-dist: "


@dataclass
class Run:
    rc: int | None  # None: killed by the harness after its timeout (a hang)
    err: str
    seconds: float

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.err

    def first_error(self) -> str:
        lines = [ln for ln in self.err.splitlines() if ln.startswith(ONE_LINE) and "error" in ln]
        return (lines[0][:150] if lines else self.err.strip().splitlines()[-1][:150] if self.err.strip() else "")


def cli(*args: str, env: dict | None = None, timeout: float = 200, cwd: Path = REPO) -> Run:
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "qlora_dist", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    try:
        _, err = proc.communicate(timeout=timeout)
        return Run(proc.returncode, err, time.time() - start)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return Run(None, err, time.time() - start)


def train(out: Path, *extra: str, **kw) -> Run:
    return cli("train", *BASE, f"train.output_dir={out}", *extra, **kw)


def input_error(run: Run, *needles: str) -> tuple[str, str]:
    """Bad input: exit 2, one line, naming what it should, no traceback."""
    named = all(n in run.err for n in needles)
    verdict = "OK" if run.rc == 2 and named and not run.traceback else "POOR" if run.rc not in (0, None) else "BAD"
    return f"rc {run.rc} in {run.seconds:.1f} s: {run.first_error()}", verdict


def fault(run: Run, *needles: str) -> tuple[str, str]:
    named = all(n in run.err for n in needles)
    verdict = "OK" if run.rc == 3 and named and not run.traceback else "POOR" if run.rc not in (0, None) else "BAD"
    return f"rc {run.rc} in {run.seconds:.1f} s: {run.first_error()}", verdict


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def same_adapter(a: Path, b: Path) -> bool:
    import torch

    x, y = adapter_tensors(a), adapter_tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


class Bench:
    def __init__(self, root: Path):
        self.root = root
        self._reference: Path | None = None

    def folder(self, name: str) -> Path:
        return self.root / name

    def reference(self) -> Path:
        """One finished 4-step run (saves at 2 and 4, keep_last 0), copied by every case that damages one."""
        if self._reference is None:
            self._reference = self.folder("reference")
            run = train(self._reference, "train.max_steps=4", "train.save_steps=2", "checkpoint.keep_last=0")
            assert run.rc == 0, run.err[-3000:]
        return self._reference

    def copy_of_reference(self, name: str, drop_final: bool = True) -> Path:
        out = self.folder(name)
        shutil.copytree(self.reference(), out)
        if drop_final:  # as if the run was cut after its last checkpoint: resume must redo the end from it
            shutil.rmtree(out / "checkpoint-4")
            shutil.rmtree(out / "adapter_model")
            (out / "completed").unlink()
        return out


CASES: dict[str, tuple[str, callable]] = {}


def case(cid: str, what: str):
    def register(fn):
        CASES[cid] = (what, fn)
        return fn
    return register


# ------------------------------------------------------------------------------------------- config
@case("C1", "unknown key")
def _(b):
    return input_error(train(b.folder("c1"), "train.max_stpes=3"), "train.max_stpes")


@case("C4", "indivisible batch on 2 ranks (check --world-size 2)")
def _(b):
    return input_error(cli("check", *BASE, "train.global_batch_size=6", "--world-size", "2"), "global_batch_size")


@case("C6", "DS JSON syntax error")
def _(b):
    bad = b.folder("c6.json")
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    return input_error(train(b.folder("c6"), f"dist.ds_config={bad}"), str(bad))


@case("C7", "YAML missing")
def _(b):
    return input_error(cli("train", str(b.folder("missing.yaml")), *BASE), "missing.yaml")


@case("C9", "YAML of binary garbage")
def _(b):
    bad = b.folder("c9.yaml")
    bad.write_bytes(os.urandom(2048))
    return input_error(cli("train", str(bad), *BASE), "c9.yaml")


@case("C10", "YAML path is a folder")
def _(b):
    d = b.folder("c10.yaml")
    d.mkdir()
    return input_error(cli("train", str(d), *BASE), "c10.yaml")


@case("C11", "duplicate YAML key")
def _(b):
    y = b.folder("c11.yaml")
    y.write_text("train:\n  max_steps: 3\n  max_steps: 4\n")
    return input_error(cli("train", str(y), *BASE), "max_steps")


@case("C12", "optim.lr=nan")
def _(b):
    return input_error(train(b.folder("c12"), "optim.lr=nan"), "optim.lr")


# ------------------------------------------------------------------------------------------- paths
def _model_copy(b, name: str) -> Path:
    from qlora_dist.model.builtin import resolve_model_path

    dst = b.folder(name)
    shutil.copytree(resolve_model_path("tiny-llama"), dst)
    return dst


@case("P1", "model folder missing")
def _(b):
    return input_error(train(b.folder("p1"), f"model.path={b.folder('no-model')}"), "no-model")


@case("P2", "malformed config.json")
def _(b):
    m = _model_copy(b, "p2-model")
    (m / "config.json").write_text("{ not json")
    return input_error(train(b.folder("p2"), f"model.path={m}"), "config.json")


@case("P3", "truncated model.safetensors")
def _(b):
    m = _model_copy(b, "p3-model")
    f = next(m.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return input_error(train(b.folder("p3"), f"model.path={m}"), f.name)


@case("P4", "read-only output folder (chattr +i)")
def _(b):
    out = b.folder("p4")
    out.mkdir()
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        return "chattr unavailable", "SKIP"
    try:
        return input_error(train(out / "run"), "not writable")
    finally:
        subprocess.run(["chattr", "-i", str(out)])


@case("P5", "output folder is a file")
def _(b):
    f = b.folder("p5")
    f.write_text("x")
    return input_error(train(f), "train.output_dir")


@case("P7", "empty .jsonl dataset")
def _(b):
    f = b.folder("p7.jsonl")
    f.write_text("")
    return input_error(train(b.folder("p7"), f"data.dataset={f}"), "p7.jsonl")


@case("P8", "binary garbage .json dataset")
def _(b):
    f = b.folder("p8.json")
    f.write_bytes(os.urandom(4096))
    return input_error(train(b.folder("p8"), f"data.dataset={f}"), "p8.json")


@case("P11", "0-byte parquet")
def _(b):
    f = b.folder("p11.parquet")
    f.write_bytes(b"")
    return input_error(train(b.folder("p11"), f"data.dataset={f}"), "p11.parquet")


# -------------------------------------------------------------------------------------- checkpoints
def _resume_equal(b, out: Path, *needles: str) -> tuple[str, str]:
    """Rerun the damaged folder: it must say what it skipped, fall back, and end equal to the reference."""
    run = train(out, "train.max_steps=4", "train.save_steps=2", "checkpoint.keep_last=0")
    said = all(n in run.err for n in needles)
    equal = run.rc == 0 and same_adapter(out / "adapter_model", b.reference() / "adapter_model")
    verdict = "OK" if equal and said and not run.traceback else "POOR" if run.rc != 0 else "BAD"
    return f"rc {run.rc} in {run.seconds:.1f} s, named {said}, final adapter equal {equal}: {run.first_error()}", verdict


def _damage_newest(b, name: str, damage) -> Path:
    """A folder whose newest checkpoint (2 of 2, 4 dropped) is damaged; checkpoint-... only 2 survive."""
    out = b.copy_of_reference(name)
    shutil.copytree(b.reference() / "checkpoint-4", out / "checkpoint-4")  # newest, to be damaged
    damage(out / "checkpoint-4")
    return out


@case("K1", "kill -9 mid-run, rerun")
def _(b):
    out = b.folder("k1")
    killed = train(out, "train.max_steps=4", "train.save_steps=2", "checkpoint.keep_last=0",
                   env={"QLORA_DIST_TEST_CRASH_IN_SAVE_AT_STEP": "4"})
    text, verdict = _resume_equal(b, out)
    return f"killed in the step-4 save (rc {killed.rc}); rerun {text}", verdict


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@case("K2", "newest engine states truncated")
def _(b):
    def damage(ck):
        for f in (ck / "engine").glob("*optim_states*"):
            _truncate(f)
    return _resume_equal(b, _damage_newest(b, "k2", damage), "checkpoint-4")


@case("K3", "garbage progress.json in the newest")
def _(b):
    return _resume_equal(b, _damage_newest(b, "k3", lambda ck: (ck / "progress.json").write_text("{garbage")),
                         "checkpoint-4")


@case("K4", "progress.json deleted in the newest")
def _(b):
    return _resume_equal(b, _damage_newest(b, "k4", lambda ck: (ck / "progress.json").unlink()))


@case("K5", "empty rng file in the newest")
def _(b):
    def damage(ck):
        for f in (ck / "rng").iterdir():
            f.write_bytes(b"")
    return _resume_equal(b, _damage_newest(b, "k5", damage), "checkpoint-4")


@case("K6", "NaN planted in the newest fp32 masters")
def _(b):
    import torch

    def damage(ck):
        for f in (ck / "engine").glob("*optim_states*"):
            state = torch.load(f, weights_only=False)
            _plant_nan(state)
            torch.save(state, f)
            _refresh_manifest(ck, f)
    out = _damage_newest(b, "k6", damage)
    return _resume_equal(b, out, "checkpoint-4")


def _plant_nan(obj) -> bool:
    import torch

    if isinstance(obj, torch.Tensor) and obj.is_floating_point() and obj.numel():
        obj.data.view(-1)[0] = float("nan")  # .data: saved masters may be leaves that require grad
        return True
    if isinstance(obj, dict):
        return any(_plant_nan(v) for k, v in obj.items() if "fp32" in str(k) or "single_partition" in str(k)
                   or "optimizer_state_dict" in str(k) or isinstance(v, (dict, list)))
    if isinstance(obj, list):
        return any(_plant_nan(v) for v in obj)
    return False


def _refresh_manifest(ck: Path, changed: Path) -> None:
    """A NaN written by the training itself would be in the manifest: update the file's entry, so the
    case tests the finiteness check, not the checksum."""
    import hashlib

    manifest = ck / "manifest.json"
    if not manifest.is_file():
        return
    data = json.loads(manifest.read_text())
    files = data.get("files", data)
    rel = str(changed.relative_to(ck))
    if rel in files:
        files[rel] = {**files[rel], "bytes": changed.stat().st_size,
                      "sha256": hashlib.sha256(changed.read_bytes()).hexdigest()}
        manifest.write_text(json.dumps(data, indent=2))


@case("K7", "0-byte final adapter in a finished folder")
def _(b):
    out = b.copy_of_reference("k7", drop_final=False)
    (out / "adapter_model" / "adapter_model.safetensors").write_bytes(b"")
    run = train(out, "train.max_steps=4", "train.save_steps=2", "checkpoint.keep_last=0")
    said_done = "already completed" in run.err
    fixed = run.rc == 0 and same_adapter(out / "adapter_model", b.reference() / "adapter_model")
    verdict = "OK" if (fixed or run.rc in (2, 3)) and not said_done and not run.traceback else "BAD"
    return f"rc {run.rc}, 'already completed' {said_done}, adapter restored {fixed}: {run.first_error()}", verdict


def _two_runs(b, name: str, lr_a: str, lr_b: str) -> tuple[str, str]:
    out = b.folder(name)
    args = ("train.max_steps=40", "train.save_steps=5")
    first = subprocess.Popen([sys.executable, "-m", "qlora_dist", "train", *BASE, f"train.output_dir={out}", *args,
                              f"optim.lr={lr_a}"], cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.2)
    second = train(out, *args, f"optim.lr={lr_b}")
    _, err = first.communicate(timeout=300)
    verdict = "OK" if first.returncode == 0 and second.rc == 2 and "being written by another run" in second.err else "BAD"
    return f"first rc {first.returncode}; second rc {second.rc}: {second.first_error()}", verdict


@case("K8", "two identical runs into one folder at once")
def _(b):
    return _two_runs(b, "k8", "3e-3", "3e-3")


@case("K9", "two runs, one folder, lr 2e-4 and 5e-3")
def _(b):
    return _two_runs(b, "k9", "2e-4", "5e-3")


@case("K10", "lora.r changed on rerun")
def _(b):
    out = b.copy_of_reference("k10")
    return input_error(train(out, "train.max_steps=4", "train.save_steps=2", "checkpoint.keep_last=0", "lora.r=16"),
                       "lora.r")


@case("K11", "init_adapter missing")
def _(b):
    return input_error(train(b.folder("k11"), f"train.init_adapter={b.folder('nothing-here')}"), "init_adapter")


@case("K13", "max_steps lowered 4 -> 2 on a finished folder")
def _(b):
    out = b.copy_of_reference("k13", drop_final=False)
    return input_error(train(out, "train.max_steps=2", "train.save_steps=2", "checkpoint.keep_last=0"), "4", "2")


@case("K14", "dataset edited between runs")
def _(b):
    src = SHARED / "alpaca" / "alpaca_tiny.json"
    data = b.folder("k14.json")
    rows = json.loads(src.read_text())
    data.write_text(json.dumps(rows))
    args = (f"data.dataset={data}", "train.max_steps=4", "train.save_steps=2")
    out = b.folder("k14")
    killed = train(out, *args, env={"QLORA_DIST_TEST_CRASH_IN_SAVE_AT_STEP": "4"})
    rows[0]["output"] = "(edited) " + rows[0]["output"]  # at the start: the end may be cut by target_max_len
    data.write_text(json.dumps(rows))
    text, verdict = input_error(train(out, *args), "data")
    return f"first run killed at step 4 (rc {killed.rc}); rerun on edited data: {text}", verdict


# ------------------------------------------------------------------------------------------ signals
def _signal_run(b, name: str, sig: int, extra: tuple, when) -> Run:
    out = b.folder(name)
    proc = subprocess.Popen([sys.executable, "-m", "qlora_dist", "train", *BASE, f"train.output_dir={out}", *extra],
                            cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    when(out, proc)
    sent = time.time()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=200)
        return Run(proc.returncode, err, time.time() - sent)
    except subprocess.TimeoutExpired:
        proc.kill()
        return Run(None, proc.communicate()[1], time.time() - sent)


def _after_steps(n: int):
    def wait(out: Path, proc) -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if sum('"loss"' in ln for ln in (out / "metrics.jsonl").read_text().splitlines()) >= n:
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.1)
    return wait


def _after_event(event: str, delay: float = 1.0):
    def wait(out: Path, proc) -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if f'"event": "{event}"' in (out / "metrics.jsonl").read_text():
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.1)
        time.sleep(delay)
    return wait


def _signal_verdict(run: Run, rc: int, bound_s: float, out: Path | None = None) -> tuple[str, str]:
    ckpts = sorted(p.name for p in out.glob("checkpoint-*")) if out else []
    ok = run.rc == rc and run.seconds <= bound_s and not run.traceback
    return f"rc {run.rc}, exit {run.seconds:.1f} s after the signal, checkpoints {ckpts}", "OK" if ok else (
        "BAD" if run.rc is None or run.seconds > 60 else "POOR")


LONG = ("train.max_steps=100000", "train.save_steps=100000")


@case("S1", "SIGTERM in training")
def _(b):
    return _signal_verdict(_signal_run(b, "s1", signal.SIGTERM, LONG, _after_steps(3)), 143, 30, b.folder("s1"))


@case("S2", "SIGUSR1 in training")
def _(b):
    return _signal_verdict(_signal_run(b, "s2", signal.SIGUSR1, LONG, _after_steps(3)), 138, 30, b.folder("s2"))


@case("S3", "SIGINT in training")
def _(b):
    return _signal_verdict(_signal_run(b, "s3", signal.SIGINT, LONG, _after_steps(3)), 130, 30, b.folder("s3"))


@case("S4", "SIGTERM during eval.at_start (200 items, 64 new tokens)")
def _(b):
    extra = (*LONG, "eval.at_start=true", "data.num_eval=200", "eval.max_new_tokens=64", "eval.batch_size=4")
    return _signal_verdict(_signal_run(b, "s4", signal.SIGTERM, extra, _after_event("plan", 4.0)), 143, 30)


@case("S5", "SIGTERM during setup (model load)")
def _(b):
    return _signal_verdict(_signal_run(b, "s5", signal.SIGTERM, LONG, _after_event("plan", 0.0)), 143, 30)


# ------------------------------------------------------------------------------------------ numerics
@case("N1", "lr=1e6 max_grad_norm=0")
def _(b):
    run = train(b.folder("n1"), "optim.lr=1e6", "optim.max_grad_norm=0", "train.max_steps=6")
    warned = "warning" in run.err.lower() or run.rc not in (0, None)
    return f"rc {run.rc}, warned {warned}: {run.first_error()}", "OK" if warned and not run.traceback else "POOR"


@case("N2", "lr=1e30 max_grad_norm=0")
def _(b):
    out = b.folder("n2")
    run = train(out, "optim.lr=1e30", "optim.max_grad_norm=0", "train.max_steps=8", "train.save_steps=2")
    completed = (out / "completed").exists()
    text, verdict = fault(run, "step")
    return f"{text}; completed {completed}", verdict if not completed else "BAD"


# ------------------------------------------------------------------------------------------ disk
@case("D1", "disk full while saving (1 MB tmpfs)")
def _(b):
    mnt = b.folder("d1")
    mnt.mkdir()
    # 1 MB: the data cache and the first checkpoint (~0.4 MB) fit, the second does not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        return "cannot mount a tmpfs here", "SKIP"
    try:
        run = train(mnt / "run", "train.max_steps=6", "train.save_steps=2")
        text, verdict = fault(run, "free")
        left = sorted(p.name for p in (mnt / "run").glob("*checkpoint-*"))
        return f"{text}; left {left}", verdict if not any(n.startswith(".tmp") for n in left) else "POOR"
    finally:
        subprocess.run(["umount", str(mnt)])


# -------------------------------------------------------------------------------------- other commands
@case("G2", "generate with a truncated adapter")
def _(b):
    out = b.copy_of_reference("g2", drop_final=False)
    _truncate(out / "adapter_model" / "adapter_model.safetensors")
    return input_error(cli("generate", "--base", "tiny-llama", "--adapter", str(out / "adapter_model"),
                           "--prompt", "hi", "--max-new-tokens", "2"), "adapter_model.safetensors")


@case("G4", "eval mmlu on binary garbage")
def _(b):
    f = b.folder("g4.jsonl")
    f.write_bytes(os.urandom(4096))
    return input_error(cli("eval", "mmlu", "--base", "tiny-llama", "--data", str(f)), "g4.jsonl")


@case("G6", "plan --gpu-memory 12XB")
def _(b):
    return input_error(cli("plan", "--preset", "7b-all", "--gpu-memory", "12XB"), "12XB")


@case("G7", "plan --world-size 0")
def _(b):
    return input_error(cli("plan", "--preset", "7b-all", "--world-size", "0"), "world-size")


@case("G8", "plan --world-size -2")
def _(b):
    return input_error(cli("plan", "--preset", "7b-all", "--world-size", "-2"), "world-size")


# --------------------------------------------------------------------------------------- trust
@case("X1", "crafted rng/rank-0.pt pickle in the newest checkpoint")
def _(b):
    marker = b.folder("x1-code-ran")

    def damage(ck):  # the newest files are safetensors (never unpickled); plant the legacy name too
        for f in (ck / "rng").iterdir():
            f.unlink()
        (ck / "rng" / "rank-0.pt").write_bytes(_payload(marker))
    out = _damage_newest(b, "x1", damage)
    run = train(out, "train.max_steps=4", "train.save_steps=2", "checkpoint.keep_last=0")
    ran = marker.exists()
    return f"rc {run.rc}, code ran {ran}: {run.first_error()}", "BAD" if ran else "OK" if not run.traceback else "POOR"


def _payload(marker: Path) -> bytes:
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    return pickle.dumps(Payload())


@case("X1b", "crafted DeepSpeed engine file (model states) with its manifest entry rewritten to match")
def _(b):
    marker = b.folder("x1b-code-ran")

    def damage(ck):
        for f in (ck / "engine").glob("*model_states.pt"):
            f.write_bytes(_payload(marker))
            _refresh_manifest(ck, f)
    out = _damage_newest(b, "x1b", damage)
    run = train(out, "train.max_steps=4", "train.save_steps=2", "checkpoint.keep_last=0")
    ran = marker.exists()
    return f"rc {run.rc}, code ran {ran}: {run.first_error()}", "BAD" if ran else "OK" if not run.traceback else "POOR"


# ============================================ issue 23, classes 3 and 7: the tokenized-data cache (wt-h1)
def _rows_file(path: Path, n: int) -> Path:
    """n generated Alpaca rows (~250 bytes each)."""
    import random

    rng, words = random.Random(n), "alpha beta gamma delta epsilon".split()
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"instruction": " ".join(rng.choices(words, k=30)), "input": "",
                                "output": " ".join(rng.choices(words, k=40))}) + "\n")
    return path


def _cache_line(run: Run) -> str:
    return next((ln.split("(cache ")[-1].rstrip(")") for ln in run.err.splitlines() if "(cache " in ln), "")


def _t1(b):
    data, cache = _rows_file(b.folder("t1.jsonl"), 20_000), b.folder("t1-cache")
    args = [*BASE, f"data.dataset={data}", f"data.cache_dir={cache}", "train.max_steps=2"]
    procs = []
    for name in ("t1a", "t1b"):
        procs.append(subprocess.Popen([sys.executable, "-m", "qlora_dist", "train", *args,
                                       f"train.output_dir={b.folder(name)}"], cwd=REPO, stderr=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, text=True))
        time.sleep(1)
    errs = [p.communicate(timeout=900)[1] for p in procs]
    left = sorted(p.name for p in cache.iterdir())
    waited = sum("another run is building" in e for e in errs)
    ok = all(p.returncode == 0 for p in procs) and len([n for n in left if not n.startswith(".")]) == 1 \
        and not any(n.endswith(".failed") or n.startswith(".tmp") for n in left)
    return (f"rc {[p.returncode for p in procs]}, {waited} waited for the other's build; left {left}",
            "OK" if ok and not any("Traceback" in e for e in errs) else "POOR")


def _t4(b):
    mnt = b.folder("t4-small")
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]).returncode != 0:
        return "cannot mount a tmpfs here", "SKIP"
    try:
        data = _rows_file(b.folder("t4.jsonl"), 20_000)
        run = train(b.folder("t4"), f"data.dataset={data}", f"data.cache_dir={mnt / 'cache'}", "train.max_steps=2", timeout=900)
        text, verdict = fault(run, str(mnt / "cache"), "data.cache_dir")
        left = sorted(p.name for p in (mnt / "cache").iterdir()) if (mnt / "cache").is_dir() else []
        return f"{text}; left {left}", verdict if not any(n.startswith(".tmp") for n in left) else "POOR"
    finally:
        subprocess.run(["umount", str(mnt)])


def _t6(b):
    data, cache = _rows_file(b.folder("t6.jsonl"), 300), b.folder("t6-cache")
    first = train(b.folder("t6a"), f"data.dataset={data}", f"data.cache_dir={cache}", "train.max_steps=2", timeout=900)
    folder = Path(_cache_line(first))
    os.truncate(folder / "rows.arrow", 2000)
    run = train(b.folder("t6b"), f"data.dataset={data}", f"data.cache_dir={cache}", "train.max_steps=2", timeout=900)
    said = f"the tokenized-data cache {folder} is damaged" in run.err
    return (f"rc {run.rc} in {run.seconds:.1f} s; said damaged+rebuilt: {said}",
            "OK" if run.rc == 0 and said and not run.traceback else "POOR" if run.rc else "BAD")


def _t8(b):
    data, cache = _rows_file(b.folder("t8.jsonl"), 300), b.folder("t8-cache")
    first = train(b.folder("t8a"), f"data.dataset={data}", f"data.cache_dir={cache}", "train.max_steps=2", timeout=900)
    st, lines = data.stat(), data.read_text().splitlines(keepends=True)
    row = json.loads(lines[0])
    lines[0] = json.dumps({**row, "output": "Z" * len(row["output"])}) + "\n"
    data.write_text("".join(lines))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    run = train(b.folder("t8b"), f"data.dataset={data}", f"data.cache_dir={cache}", "train.max_steps=2", timeout=900)
    a, c = _cache_line(first), _cache_line(run)
    return (f"rc {run.rc}; same size {data.stat().st_size == st.st_size}, same mtime; cache {Path(a).name} -> "
            f"{Path(c).name}", "OK" if run.rc == 0 and a and c and a != c else "BAD")


def _t10(b):
    data = _rows_file(b.folder("t10.jsonl"), 60_000)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(__import__("conftest").free_port()), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2"}
    args = ["train", *BASE, f"data.dataset={data}", f"data.cache_dir={b.folder('t10-cache')}",
            f"train.output_dir={b.folder('t10')}", "dist.timeout_s=10"]
    procs = [subprocess.Popen([sys.executable, "-m", "qlora_dist", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True,
                              env={**os.environ, **env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    try:
        for line in procs[0].stderr:  # rank 0 prints; kill it 3 s into its build
            if "reading, validating and tokenizing" in line:
                break
        time.sleep(3)
        os.killpg(procs[0].pid, signal.SIGKILL)
        killed = time.time()
        err = procs[1].communicate(timeout=120)[1]
        waited = time.time() - killed
    except subprocess.TimeoutExpired:
        return "rank 1 still waiting 120 s after rank 0 was killed", "BAD"
    finally:
        for p in procs:
            p.kill()
    text, verdict = fault(Run(procs[1].returncode, err, waited), "rank 1: waited for rank 0 to build",
                          "dist.timeout_s")
    return f"rank 1 ended {waited:.1f} s after rank 0's kill -9: {text}", verdict if waited < 10 + 15 else "POOR"


CACHE_CASES = [("T1", "two trainings build the same new cache at once", _t1),
               ("T4", "data.cache_dir on a full 2 MB tmpfs", _t4),
               ("T6", "cache rows.arrow truncated, report.json intact", _t6),
               ("T8", "dataset edited in place, size and mtime kept (small-file variant)", _t8),
               ("T10", "ranks started by hand, rank 0 killed -9 during the cache build (dist.timeout_s=10)", _t10)]
CASES.update({cid: (what, fn) for cid, what, fn in CACHE_CASES})
# ======================================================================== end of issue 23 cache block (wt-h1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated case ids")
    ap.add_argument("--json", help="write the rows here too")
    ns = ap.parse_args()
    wanted = [c for c in ns.only.split(",") if c] or list(CASES)
    rows = []
    with tempfile.TemporaryDirectory(prefix="redteam-") as tmp:
        bench = Bench(Path(tmp))
        for cid in wanted:
            what, fn = CASES[cid]
            start = time.time()
            try:
                observed, verdict = fn(bench)
            except Exception as exc:  # noqa: BLE001 - the harness reports, it does not stop
                observed, verdict = f"harness error: {type(exc).__name__}: {exc}"[:200], "ERROR"
            rows.append({"id": cid, "case": what, "observed": observed, "verdict": verdict,
                         "seconds": round(time.time() - start, 1)})
            print(f"| {cid} | {what} | {observed} | {verdict} |", flush=True)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("OK", "POOR", "BAD", "SKIP", "ERROR")}
    print(" ".join(f"{k} {n}" for k, n in counts.items() if n))
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
