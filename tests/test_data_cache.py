"""The tokenized-data cache outside the happy path (issue 23): its worker pool always ends (the random
hang after "records read, validated and tokenized"), and the cache verifies itself: a content fingerprint
that size and time cannot fool, damage found on open and rebuilt, concurrent builders that agree, a full
disk named, stale temporary folders removed."""
from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from qlora_dist.config import load_config
from qlora_dist.data import corpus
from qlora_dist.errors import RunFault
from qlora_dist.launch.dist import DistInfo

ONE_RANK = DistInfo(0, 0, 1)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from qlora_dist.model.base import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def alpaca_file(path: Path, n: int, tag: str = "") -> Path:
    path.write_text("".join(json.dumps({"instruction": f"Repeat {tag}{i} " * (1 + i % 7), "input": "",
                                        "output": f"{i} " * (1 + i % 11)}) + "\n" for i in range(n)))
    return path


@pytest.fixture
def trainer_signals():
    """The trainer's signal handlers (train/preempt.StopRequest, in its data phase), as forked workers
    inherit them; pytest's own are restored afterwards."""
    from qlora_dist.train.preempt import StopRequest

    stop = StopRequest()
    stop.at("data")
    yield stop
    stop.restore()


def tokenizers(tokenizer, path: Path, monkeypatch):
    """The cache's pool on `path`, 2 workers, batches of 32 examples, every batch in a worker."""
    monkeypatch.setattr(corpus._Tokenizers, "SERIAL_BATCHES", 0)
    cfg = load_config(overrides=[f"data.dataset={path}"])
    tok = corpus._Tokenizers(tokenizer, cfg, corpus._token_type(len(tokenizer)))
    tok.workers = 2
    _, stream = corpus.open_dataset(cfg.data.entries()[0], cfg)
    return tok, iter(lambda: list(itertools.islice(stream, 32)), [])


def finishes(fn, timeout_s: float):
    """fn() run in a thread: (finished within timeout_s, its exception or None). A hang is a failure
    of the test, not of the suite."""
    out = {}

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            out["exc"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive(), out.get("exc")


# ------------------------------------------------------------------------------------------ the pool
def test_a_worker_dies_plainly_on_the_signals_the_trainer_handles(tmp_path, tokenizer, monkeypatch, capfd,
                                                                  trainer_signals):
    """The hang's cause: workers forked from the trainer ran its Python SIGTERM handler, and a SIGTERM
    that lands just before a worker blocks on Pool's task-queue lock is recorded but never handled
    (seen in a hung worker with gdb: Handlers[SIGTERM].tripped == 1, the worker in sem_wait). With
    default handling the kernel ends the worker whatever it is doing: exit code -signal, nothing printed."""
    tok, batches = tokenizers(tokenizer, alpaca_file(tmp_path / "a.jsonl", 200), monkeypatch)
    with tok:
        results = tok.map(batches)
        next(results)  # the workers are started and have work
        workers = multiprocessing.active_children()
        assert len(workers) == 2
        for proc, sig in zip(workers, (signal.SIGTERM, signal.SIGUSR1)):
            os.kill(proc.pid, sig)
            proc.join(10)
            assert proc.exitcode == -sig, (sig, proc.exitcode)
        with pytest.raises(RunFault, match=r"tokenizing worker process \(pid \d+\) died with exit code -"):
            list(results)
    assert "SIGTERM" not in capfd.readouterr().err
    assert multiprocessing.active_children() == []


def test_a_worker_killed_mid_build_is_an_error_not_a_hang(tmp_path, tokenizer, monkeypatch, trainer_signals):
    """multiprocessing.Pool replaced a killed worker and waited for ever for the batch it held."""
    tok, batches = tokenizers(tokenizer, alpaca_file(tmp_path / "a.jsonl", 400), monkeypatch)

    def build():
        with tok:
            for i, _ in enumerate(tok.map(batches)):
                if i == 1:
                    os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
    done, exc = finishes(build, 60)
    assert done, "the build hung after a worker was killed"
    assert isinstance(exc, RunFault) and "died with exit code -9" in str(exc)
    assert multiprocessing.active_children() == []


def test_every_build_through_the_pool_ends_and_no_worker_is_signalled(tmp_path, tokenizer, monkeypatch,
                                                                       trainer_signals):
    """Six builds under the trainer's handlers: each ends in seconds, every worker exits 0 on its stop
    message (Pool.terminate SIGTERMed them), and the rows equal the in-process tokenization's."""
    path = alpaca_file(tmp_path / "a.jsonl", 160)
    for _ in range(6):
        tok, batches = tokenizers(tokenizer, path, monkeypatch)
        got = {}

        def build():
            with tok:
                got["rows"] = sum(table.num_rows for _, table, _ in tok.map(batches))
        assert finishes(build, 60) == (True, None)
        assert got["rows"] == 160 and tok.pool.exit_codes() == [0, 0]
