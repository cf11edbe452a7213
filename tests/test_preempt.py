"""The stop request: a signal is never lost, whenever it lands; in every phase of a run (set-up, data,
loading, evaluation, a save, training) it stops the job at the next point all ranks agree on, or at once
where nothing would be lost, with a usable newest checkpoint (the Slurm and submitit jobs are in
test_slurm.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, load_adapter_tensors, read_metrics, run_cli, run_torchrun
from qlora_dist.train.preempt import SIGNAL_AT_ENV, StopRequest, Stopped, _test_signals


def test_a_signal_landing_during_the_agreement_is_carried_to_the_next_one(monkeypatch):
    """Two ranks, as the collective sees it: the signal reaches this rank while the all-reduce is in
    flight. That answer is 0 (the value was already sent); the next must be the signal, not 0."""
    calls = []

    def all_reduce(flag, op=None):
        calls.append(int(flag.item()))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # lands mid-collective; the peer had nothing either

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    stop = StopRequest()
    stop.immediate = False  # training: signals wait for the agreement
    try:
        assert stop.agreed() == 0
        assert stop.agreed() == signal.SIGUSR1
        assert calls == [0, signal.SIGUSR1]
    finally:
        stop.restore()


# ------------------------------------------------------------------------------------------ modes (unit)
def test_immediate_mode_exits_at_once_and_deferred_mode_only_records(monkeypatch):
    """Set-up (immediate): the handler itself ends the process, 128 + signum, whatever was running.
    Training (deferred): a signal, and a second one (as during a save), are only recorded."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest()
    try:
        with pytest.raises(SystemExit) as exc:
            os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: a clean 130
        assert exc.value.code == 130 and signal.getsignal(signal.SIGINT) is before  # handed back
    finally:
        stop.restore()
    stop = StopRequest()
    stop.immediate = False
    try:
        stop.at("save")
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert (stop.received, stop.received_at) == (signal.SIGTERM, ("save", 1))
        with pytest.raises(Stopped) as stopped:
            stop.point("train")
        assert (stopped.value.signum, stopped.value.phase, stopped.value.passes) == (signal.SIGTERM, "train", 1)
    finally:
        stop.restore()


def test_a_signal_after_the_last_point_of_a_deferred_block_ends_the_process_when_it_closes():
    stop = StopRequest()
    try:
        with pytest.raises(SystemExit) as exc:
            with stop.deferred():
                os.kill(os.getpid(), signal.SIGUSR2)
                assert stop.received == signal.SIGUSR2  # recorded, not acted on inside the block
        assert exc.value.code == 140
    finally:
        stop.restore()


def test_the_test_hook_reads_phase_pass_signals_and_rank(monkeypatch):
    monkeypatch.setenv(SIGNAL_AT_ENV, "save:2:SIGUSR1+SIGTERM:1")
    assert _test_signals(1) == ("save", 2, [signal.SIGUSR1, signal.SIGTERM]) and _test_signals(0) is None
    monkeypatch.setenv(SIGNAL_AT_ENV, "data")
    assert _test_signals(0) == ("data", 1, [signal.SIGTERM])


# ------------------------------------------------------------------------------- signals in real runs
# 4 steps, a checkpoint at step 3 (and 4), held-out eval (3 batches) and MMLU (4 batches) after step 2.
RUN = [*TINY, "data.num_eval=2", "train.max_steps=4", "train.save_steps=3", "eval.steps=2", "eval.batch_size=2",
       "eval.mmlu_steps=2", "eval.mmlu_batch_size=1", "eval.mmlu_at_end=false"]
CASES = {  # case: (QLORA_DIST_TEST_SIGNAL_AT, exit code, stop record (phase, passes, step, saved) or None)
    "evaluate": ("evaluate:2:SIGUSR1@resume", 138, ("evaluate", 2, 2, True)),
    "mmlu": ("mmlu:2:SIGUSR2@resume", 140, ("mmlu", 2, 2, True)),
    "save": ("save:1:SIGUSR1+SIGTERM@resume", 143, ("train", 3, 3, False)),  # both land in the step-3 save
    "train": ("train:1:SIGINT@resume", 130, ("train", 1, 1, True)),
    "data": ("data:1", 143, None),  # immediate: nothing to lose
    "from_pretrained": ("loading:1", 143, None),  # immediate: one library call
    "layerwise": ("loading:3,model.loader=layerwise", 143, ("loading", 3, 0, False)),  # per layer
}


def _mmlu_file(folder: Path) -> Path:
    path = folder / "mmlu.jsonl"
    head = "The following are multiple choice questions (with answers) about  anatomy.\n\n"
    rows = [{"subject": "anatomy", "input": f"{head}What is {a}+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:",
             "output": "ABCD"[a - 1]} for a in range(1, 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _stop_record(out: Path) -> dict | None:
    stops = [r for r in read_metrics(out) if r.get("event") == "stop"]
    assert len(stops) <= 1
    return stops[0] if stops else None


def _same_adapter(a: Path, b: Path) -> bool:
    x, y = load_adapter_tensors(a / "adapter_model"), load_adapter_tensors(b / "adapter_model")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    """Every case of CASES in one process (tests/workers/preempt_cases.py), with one uninterrupted run."""
    out = tmp_path_factory.mktemp("preempt")
    cases = [f"{name}={spec}" for name, (spec, _, _) in CASES.items()]
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "preempt_cases.py"), str(out),
                           "reference=-", *cases, "--", *RUN, f"eval.mmlu_data={_mmlu_file(out)}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # a hang guard, nothing more
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_signal_in_each_phase_stops_within_one_point_and_the_requeued_run_ends_as_uninterrupted(one_rank, case):
    spec, code, expected = CASES[case]
    results = json.loads((one_rank / "rank-0.json").read_text())[case]
    assert results["code"] == code
    stop = _stop_record(one_rank / case)
    if expected is None:  # ended by the handler itself, before any point: no record, no step
        assert stop is None and not any("loss" in r for r in read_metrics(one_rank / case))
    else:  # the first point after the signal: within one batch / layer / step of where it landed
        assert (stop["phase"], stop["passes"], stop["step"], stop["saved"]) == expected
        received = stop["received_in"]
        assert received["phase"] == spec.split(":")[0]
        if received["phase"] == stop["phase"]:
            assert stop["passes"] - received["passes"] <= 1
        else:  # in the save: the save completed, then the step's own point stopped it (no second save)
            assert received == {"phase": "save", "passes": 1} and stop["passes"] == stop["step"]
    if spec.endswith("@resume"):  # the newest checkpoint was usable: the rerun ends bitwise as the reference
        assert results["resumed_code"] == 0
        assert _same_adapter(one_rank / "reference", one_rank / case)
    else:
        assert not list((one_rank / case).glob("checkpoint-*"))


@pytest.mark.slow
def test_ctrl_c_during_the_first_evaluation_ends_with_130_no_traceback_no_requeue(tmp_path):
    out = tmp_path / "interrupted"
    proc = run_cli("train", *TINY, "train.max_steps=2", "eval.at_start=true", f"train.output_dir={out}",
                   env={SIGNAL_AT_ENV: "evaluate:1:SIGINT", "SLURM_JOB_ID": "4242"}, check=False, timeout=120)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    assert "SIGINT: nothing to save yet; exiting (interrupted by hand: not requeued)" in proc.stderr
    stop = _stop_record(out)
    assert (stop["phase"], stop["passes"], stop["step"], stop["saved"]) == ("evaluate", 1, 0, False)
    assert not list(out.glob("checkpoint-*"))


@pytest.mark.slow
def test_two_ranks_stop_together_when_one_is_signalled_and_a_rank_leaving_at_once_ends_the_job(tmp_path):
    """ZeRO-3 on 2 ranks, the signal to rank 1 only: in the evaluation (generation in lockstep), both stop
    at the batch where it landed and save; in the layer-wise load, both stop at that layer. Last, rank 1
    alone leaves at once while rank 0 waits on it in a collective: the job ends (the test's timeout is far
    below the 600 s collective timeout), the launcher reporting rank 1's 143."""
    out = tmp_path / "two"
    out.mkdir()
    proc = run_torchrun(2, str(out), "--then-rank1-alone-at-data", "reference=-",
                        "evaluate=evaluate:2:SIGTERM:1@resume", "layerwise=loading:3:SIGUSR1:1", "--",
                        *TINY, "data.num_eval=2", "train.max_steps=4", "train.save_steps=3", "eval.steps=2", "eval.batch_size=1",
                        "dist.ds_config=zero3", script=str(REPO / "tests" / "workers" / "preempt_cases.py"),
                        timeout=120, check=False)
    results = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1] == {"reference": {"code": 0}, "evaluate": {"code": 143, "resumed_code": 0},
                                        "layerwise": {"code": 138}}
    evaluate, layerwise = _stop_record(out / "evaluate"), _stop_record(out / "layerwise")
    assert (evaluate["phase"], evaluate["passes"], evaluate["step"], evaluate["saved"]) == ("evaluate", 2, 2, True)
    assert evaluate["received_in"] is None  # rank 0 wrote it; rank 1 got the signal
    assert (layerwise["phase"], layerwise["passes"], layerwise["saved"]) == ("loading", 3, False)
    assert _same_adapter(out / "reference", out / "evaluate")
    assert proc.returncode != 0 and "exitcode  : 143" in proc.stderr
