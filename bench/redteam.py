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
from contextlib import contextmanager
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
@contextmanager
def tmpfs(b, name: str, options: str):
    """A tmpfs mounted at b.folder(name) (`-o options`: a size, ro), unmounted afterwards; None where this
    machine cannot mount one (not root)."""
    mnt = b.folder(name)
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True).returncode:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)])


NO_TMPFS = "cannot mount a tmpfs here", "SKIP"


@case("D1", "disk full while saving (1 MB tmpfs)")
def _(b):
    # 1 MB: the data cache and the first checkpoint (~0.4 MB) fit, the second does not
    with tmpfs(b, "d1", "size=1m") as mnt:
        if mnt is None:
            return NO_TMPFS
        run = train(mnt / "run", "train.max_steps=6", "train.save_steps=2")
        text, verdict = fault(run, "free")
        left = sorted(p.name for p in (mnt / "run").glob("*checkpoint-*"))
        return f"{text}; left {left}", verdict if not any(n.startswith(".tmp") for n in left) else "POOR"


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


# ==================================================================== issue 23, classes 1, 2, 5 (wt-h2)
# shared/redteam/2026-12-07.md's G1-G4, E3, E5, C13, C15 (ids prefixed r7- so as not to collide with the
# older G2/G4 above), plus the output checks of merge and prepare-model. An input error must come before
# the model loads: within EARLY_S (the interpreter and torch import take ~3 s idle, up to ~18 s measured
# with 5 sessions sharing 2 cores; the message itself is the evidence, the bound catches a run that loads).
EARLY_S = 30
QUESTIONS = SHARED / "vicuna_bench" / "fastchat_llm_judge" / "question.jsonl"
MMLU_JSON = SHARED / "mmlu" / "zero_shot_mmlu_val.json"
ALPACA_TINY = SHARED / "alpaca" / "alpaca_tiny.json"


def _early(run: Run, *needles: str, absent: str | None = None) -> tuple[str, str]:
    """input_error, and within EARLY_S, and (absent) without a second line containing that text."""
    text, verdict = input_error(run, *needles)
    if verdict == "OK" and (run.seconds > EARLY_S or (absent and absent in run.err)):
        verdict = "POOR"
    return text, verdict


def _generate(*extra: str) -> Run:
    return cli("generate", "--base", "tiny-llama", "--compute-dtype", "float32", *extra)


def _r7_g1(b):
    return _early(_generate("--prompt", "hello", "--max-new-tokens", "0"), "--max-new-tokens: must be > 0")


def _r7_g2(b):
    runs = [_early(_generate("--prompt", "hello", *a), n) for a, n in (
        (("--temperature", "-1"), "--temperature"), (("--temperature", "nan"), "--temperature"),
        (("--temperature", "1", "--top-p", "2"), "--top-p"))]
    return "; ".join(t for t, _ in runs), "OK" if all(v == "OK" for _, v in runs) else "POOR"


def _r7_g3(b):
    return _early(_generate("--prompt", "hello", "--max-new-tokens", "100000000"), "max_position_embeddings")


def _answers_to(b, out: Path, *needles: str) -> tuple[str, str]:
    """generate --prompts ... --out OUT: refused early, and no (hidden) file appears beside OUT."""
    parent = out.parent if out.parent.is_dir() else out.parent.parent
    before = sorted(p.name for p in parent.iterdir())
    text, verdict = _early(_generate("--prompts", str(QUESTIONS), "--max-new-tokens", "2", "--out", str(out)), *needles)
    left = sorted(set(p.name for p in parent.iterdir()) - set(before))
    return f"{text}; new files {left}", verdict if not left else "BAD"


def _r7_g4a(b):
    (b.folder("g4a-ofile")).write_text("a file\n")
    return _answers_to(b, b.folder("g4a-ofile") / "answers.jsonl", "--out", "is a file")


def _r7_g4b(b):
    with tmpfs(b, "g4b-ro", "ro,size=1m") as mnt:
        return _answers_to(b, mnt / "answers.jsonl", "--out", "not writable") if mnt else NO_TMPFS


def _r7_g4c(b):
    b.folder("g4c-dir").mkdir()
    return _answers_to(b, b.folder("g4c-dir"), "--out", "is a folder")


def _r7_e3(b):
    return _early(cli("eval", "mmlu", "--base", "tiny-llama", "--data", str(MMLU_JSON), "--batch-size", "0",
                      "--max-questions", "4"), "--batch-size: must be > 0", absent="--max-questions")


def _old_adapter(b) -> Path:
    """The reference run's adapter as a qlora-dist before the base's identity was recorded saved it."""
    old = b.folder("e5-old-adapter")
    if not old.exists():
        shutil.copytree(b.reference() / "adapter_model", old)
        settings = json.loads((old / "qlora_dist.json").read_text())
        settings = {k: v for k, v in settings.items() if k not in ("base_model_type", "base_config_sha256")}
        (old / "qlora_dist.json").write_text(json.dumps(settings))
    return old


def _r7_e5a(b):
    return _early(cli("eval", "mmlu", "--base", "tiny:qwen2", "--adapter", str(b.reference() / "adapter_model"),
                      "--compute-dtype", "float32", "--data", str(MMLU_JSON), "--max-questions", "4"),
                  "'llama' base", "'qwen2' model", "--allow-base-mismatch")


def _r7_e5b(b):
    out = b.folder("e5b-merged")
    text, verdict = _early(cli("merge", "--base", "tiny:qwen2", "--adapter", str(_old_adapter(b)), "--out", str(out)),
                           "'llama' base", "'qwen2' model")
    return f"{text}; out made {out.exists()}", verdict if not out.exists() else "BAD"


def _r7_e5c(b):
    return _early(_generate("--prompt", "hi", "--max-new-tokens", "2", "--adapter", str(_old_adapter(b)),
                            "--base", "tiny:qwen2"), "'llama' base")


def _r7_c13(b):
    return _early(train(b.folder("c13"), f"data.dataset={ALPACA_TINY}", "train.seed=99999999999999999999999"),
                  "train.seed: must be an integer in [0, 4294967295]")


def _r7_c15(b):
    runs = [_early(train(b.folder(f"c15{i}"), *a), n, absent="fewer than one global batch") for i, (a, n) in enumerate((
        ((f"data.dataset=[{{path: {ALPACA_TINY}, weight: -1}}]",), "weight: must be a number > 0"),
        ((f"data.dataset=[{{path: {ALPACA_TINY}, weight: abc}}]",), "weight: must be a finite number > 0"),
        ((f"data.dataset={ALPACA_TINY}", "data.max_examples=-1"), "data.max_examples: must be >= 0")))]
    return "; ".join(t for t, _ in runs), "OK" if all(v == "OK" for _, v in runs) else "POOR"


def _r7_o1(b):
    full = b.folder("o1-full")
    full.mkdir()
    (full / "keep.txt").write_text("keep")
    run = cli("merge", "--base", "tiny-llama", "--adapter", str(b.reference() / "adapter_model"), "--out", str(full))
    text, verdict = _early(run, "--out", "not empty")
    return text, verdict if sorted(p.name for p in full.iterdir()) == ["keep.txt"] else "BAD"


def _r7_o2(b):
    full = b.folder("o2-full")
    full.mkdir()
    (full / "keep.txt").write_text("keep")
    text, verdict = _early(cli("prepare-model", "tiny:qwen2", "--out", str(full)), "--out", "not empty")
    return text, verdict if (full / "keep.txt").is_file() else "BAD"


def _r7_o3(b):
    with tmpfs(b, "o3-ro", "ro,size=1m") as mnt:
        if mnt is None:
            return NO_TMPFS
        return _early(cli("merge", "--base", "tiny-llama", "--adapter", str(b.reference() / "adapter_model"),
                          "--out", str(mnt / "merged")), "--out", "not writable")


H2_CASES = [
    ("r7-G1", "generate --max-new-tokens 0", _r7_g1),
    ("r7-G2", "generate --temperature -1 / nan, --top-p 2", _r7_g2),
    ("r7-G3", "generate --max-new-tokens 100000000 (past the 512 positions)", _r7_g3),
    ("r7-G4a", "generate --prompts --out under a file", _r7_g4a),
    ("r7-G4b", "generate --prompts --out on a read-only mount", _r7_g4b),
    ("r7-G4c", "generate --prompts --out an existing folder", _r7_g4c),
    ("r7-E3", "eval mmlu --batch-size 0 --max-questions 4", _r7_e3),
    ("r7-E5a", "eval mmlu --base tiny:qwen2 with an adapter of the tiny LLaMA", _r7_e5a),
    ("r7-E5b", "merge --base tiny:qwen2, adapter saved before the base identity was recorded", _r7_e5b),
    ("r7-E5c", "generate --base tiny:qwen2, the same older adapter", _r7_e5c),
    ("r7-C13", "train.seed beyond 64 bits", _r7_c13),
    ("r7-C15", "mixture weight -1 / 'abc', data.max_examples=-1: one line only", _r7_c15),
    ("r7-O1", "merge --out a non-empty folder (kept intact)", _r7_o1),
    ("r7-O2", "prepare-model --out a non-empty folder (kept intact)", _r7_o2),
    ("r7-O3", "merge --out on a read-only mount", _r7_o3),
]
CASES.update({cid: (what, fn) for cid, what, fn in H2_CASES})
# ================================================================ end of issue 23, classes 1, 2, 5 (wt-h2)
# ------------------------------------------- issue 23, classes 4 and 6: stale locks, misread input files


def _alpaca_rows() -> list[dict]:
    return [{k: r[k] for k in ("instruction", "input", "output")} for r in json.loads(ALPACA_TINY.read_text())]


def _trained_on_all(run: Run, n: int, *absent: str) -> tuple[str, str]:
    """A run that must read every one of the n rows, with no skip of the named kinds and no warning."""
    summary = next((ln for ln in run.err.splitlines() if " records -> " in ln), "no data summary")
    ok = run.rc == 0 and f"{n:,} records -> {n:,} examples" in summary and not any(a in run.err for a in absent)
    return f"rc {run.rc} in {run.seconds:.1f} s: {summary.split('] ')[-1][:140]}", "OK" if ok else (
        "POOR" if run.traceback else "BAD")


@case("D14", "Alpaca data as CSV (empty `input` cells, written by Python's csv module)")
def _(b):
    import csv

    path = b.folder("plain.csv")
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(_alpaca_rows())
    return _trained_on_all(train(b.folder("d14"), f"data.dataset={path}", "train.max_steps=2"), 100,
                           "missing_field", "warning:")


@case("D8", "JSONL saved with a UTF-8 BOM")
def _(b):
    path = b.folder("bom.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in _alpaca_rows()), encoding="utf-8-sig")
    return _trained_on_all(train(b.folder("d8"), f"data.dataset={path}", "train.max_steps=2"), 100, "bad_json")


def _peak_rss_mib(*args: str) -> tuple[Run, float]:
    """A CLI run and its peak RSS, measured by a parent of its own (RUSAGE_CHILDREN is per waiting process)."""
    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stderr.write(p.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.exit(p.returncode)")
    start = time.time()
    done = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "qlora_dist", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    return Run(done.returncode, done.stderr, time.time() - start), int(done.stdout.split()[-1]) / 1024


@case("D7", "single-line JSONL, a 200 MiB line (+100 good rows): the preflight's peak RSS")
def _(b):
    line_mib = 200
    plain, huge = b.folder("d7-plain.jsonl"), b.folder("d7-huge.jsonl")
    plain.write_text("".join(json.dumps(r) + "\n" for r in _alpaca_rows()))
    with open(huge, "wb") as fh:
        fh.write(b'{"instruction": "')
        for _ in range(line_mib):
            fh.write(b"a" * 2**20)
        fh.write(b'", "output": "x"}\n' + plain.read_bytes())
    _, base = _peak_rss_mib("check", *BASE, f"data.dataset={plain}", f"train.output_dir={b.folder('d7')}")
    checked, peak = _peak_rss_mib("check", *BASE, f"data.dataset={huge}", f"train.output_dir={b.folder('d7')}")
    run = train(b.folder("d7"), f"data.dataset={huge}", "train.max_steps=2")
    skipped = "too_long 1" in run.err and "100 examples" in run.err
    ok = checked.rc == 0 and run.rc == 0 and skipped and peak - base < line_mib / 2
    return (f"check peak RSS {peak:.0f} MiB vs {base:.0f} MiB without the line (+{peak - base:.0f}); train rc "
            f"{run.rc}, skipped as too_long: {skipped}"), "OK" if ok else "POOR"


def _plant_lock_record(out: Path, pid: int) -> None:
    """OUT/.lock.json as a run killed with -9 on this host left it, its pid now `pid`; the OS lock is free."""
    from dataclasses import asdict

    from qlora_dist.writer_lock import Holder

    holder = Holder.me()
    holder.pid, holder.heartbeat_at = pid, time.time() - 40
    out.mkdir(parents=True, exist_ok=True)
    (out / ".lock.json").write_text(json.dumps(asdict(holder)))


@case("O5", "lock record naming a live, unrelated pid (pid reuse after a kill -9); the OS lock is free")
def _(b):
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        _plant_lock_record(b.folder("o5"), sleeper.pid)
        run = train(b.folder("o5"), "train.max_steps=2")
    finally:
        sleeper.kill()
        sleeper.wait()
    took = next((ln.split("] ")[-1] for ln in run.err.splitlines() if "taking over the lock" in ln), "")
    return f"rc {run.rc} in {run.seconds:.1f} s: {(took or run.first_error())[:150]}", \
        "OK" if run.rc == 0 and took else "POOR"


def _in_new_pid_namespace(out: Path, *extra: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    """A run as pid 1 of a new pid namespace, with a private copy of the torch extensions folder: a kill -9
    while DeepSpeed's shm op loads leaves torch's build lock (FileBaton, torch 2.13: no staleness check)
    behind, and every later run using that folder would wait on it forever."""
    shared, private = Path(os.environ["TORCH_EXTENSIONS_DIR"]), out.parent / f"{out.name}-torch-extensions"
    if not private.exists() and shared.is_dir():
        shutil.copytree(shared, private, ignore=shutil.ignore_patterns("lock", ".ninja_lock"))
    return subprocess.Popen(["unshare", "-fp", "--mount-proc", sys.executable, "-m", "qlora_dist", "train", *BASE,
                             f"train.output_dir={out}", *extra], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True, start_new_session=True,
                            env={**os.environ, "TORCH_EXTENSIONS_DIR": str(private)})


@case("O6", "container restart: a fresh pid namespace after a kill -9 (unshare -fp)")
def _(b):
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return "needs unshare as root", "SKIP"
    out = b.folder("o6")
    first = _in_new_pid_namespace(out, "train.max_steps=400", stderr=subprocess.DEVNULL)
    _after_steps(1)(out, first)  # killed in training, as the red team did
    held_by = json.loads((out / ".lock.json").read_text())["pid"] if (out / ".lock.json").is_file() else None
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    start, second = time.time(), _in_new_pid_namespace(out, "train.max_steps=2")
    try:
        _, err = second.communicate(timeout=300)
        run = Run(second.returncode, err, time.time() - start)
    except subprocess.TimeoutExpired:
        os.killpg(second.pid, signal.SIGKILL)  # the namespace's pid 1 with it
        run = Run(None, second.communicate()[1], time.time() - start)
    took = next((ln.split("] ")[-1] for ln in run.err.splitlines() if "taking over the lock" in ln), "")
    return (f"first run held it as pid {held_by}; restart rc {run.rc} in {run.seconds:.1f} s: "
            f"{(took or run.first_error())[:120]}"), "OK" if run.rc == 0 and "pid 1 is this run" in took else "POOR"


@case("O7", "OUTPUT/.lock is a folder")
def _(b):
    (b.folder("o7") / ".lock").mkdir(parents=True)
    return input_error(train(b.folder("o7"), "train.max_steps=2"), str(b.folder("o7") / ".lock"), "folder")



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
    with tmpfs(b, "t4-small", "size=2m") as mnt:
        if mnt is None:
            return NO_TMPFS
        data = _rows_file(b.folder("t4.jsonl"), 20_000)
        run = train(b.folder("t4"), f"data.dataset={data}", f"data.cache_dir={mnt / 'cache'}", "train.max_steps=2", timeout=900)
        text, verdict = fault(run, str(mnt / "cache"), "data.cache_dir")
        left = sorted(p.name for p in (mnt / "cache").iterdir()) if (mnt / "cache").is_dir() else []
        return f"{text}; left {left}", verdict if not any(n.startswith(".tmp") for n in left) else "POOR"


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
