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
from qlora_dist.dist import DistInfo

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
    """Three builds under the trainer's handlers: each ends in seconds, every worker exits 0 on its stop
    message (Pool.terminate SIGTERMed them), and the rows equal the in-process tokenization's."""
    path = alpaca_file(tmp_path / "a.jsonl", 160)
    for _ in range(3):
        tok, batches = tokenizers(tokenizer, path, monkeypatch)
        got = {}

        def build():
            with tok:
                got["rows"] = sum(table.num_rows for _, table, _ in tok.map(batches))
        assert finishes(build, 60) == (True, None)
        assert got["rows"] == 160 and tok.pool.exit_codes() == [0, 0]


# ------------------------------------------------------------------------------- a cache that checks itself
def build(tokenizer, data: Path, cache: Path, *overrides: str):
    cfg = load_config(overrides=[f"data.dataset={data}", *overrides])
    return corpus.cached_rows(cfg, tokenizer, ONE_RANK, cache)


def test_an_edit_that_keeps_size_and_time_is_new_data(tmp_path, tokenizer):
    """T8: one line rewritten in place to the same length, the modification time restored: a new
    fingerprint and new rows (size+mtime keyed files over 256 MB trained on the old rows)."""
    data = alpaca_file(tmp_path / "d.jsonl", 40)
    rows, report = build(tokenizer, data, tmp_path / "c")
    st = data.stat()
    text = data.read_text()
    first = json.loads(text.splitlines()[0])
    edited = json.dumps({**first, "output": "Z" * len(first["output"])})
    assert len(edited) == len(text.splitlines()[0])
    data.write_text(edited + text[text.index("\n"):])
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (data.stat().st_size, data.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    again, report2 = build(tokenizer, data, tmp_path / "c")
    assert report2["cache"] != report["cache"] and again[0].input_ids != rows[0].input_ids
    assert again[1] == rows[1]


def test_a_damaged_cache_is_named_and_rebuilt(tmp_path, tokenizer, capfd):
    """T6: a truncated rows.arrow, a flipped byte (same size), a missing report: each found on open,
    logged naming the folder and why, and rebuilt to the same rows."""
    data = alpaca_file(tmp_path / "d.jsonl", 60)
    rows, report = build(tokenizer, data, tmp_path / "c")
    folder = Path(report["cache"])
    rows_file = folder / corpus.ROWS_FILE
    size = rows_file.stat().st_size
    expected = [rows[i] for i in range(len(rows))]

    def flip(f):
        raw = bytearray(f.read_bytes())
        raw[size // 2] ^= 0xFF
        f.write_bytes(bytes(raw))
    for harm, why in [(lambda f: os.truncate(f, 2000), f"has 2,000 bytes, report.json says {size:,}"),
                      (flip, "content differs from its hash"),
                      (lambda f: (f.parent / "report.json").write_text("{"), "report.json unreadable")]:
        harm(rows_file)
        assert corpus.damage(folder) is not None
        capfd.readouterr()
        again, _ = build(tokenizer, data, tmp_path / "c")
        log = capfd.readouterr().err
        assert f"the tokenized-data cache {folder} is damaged" in log and why in log, log
        assert [again[i] for i in range(len(again))] == expected and corpus.damage(folder) is None


def test_concurrent_builders_agree_and_leave_nothing_behind(tmp_path, tokenizer):
    """T1: two processes build the same new cache at once: one builds, the other waits for the lock and
    uses that cache; both get the same rows, no `.failed`, no temporary folder. A killed build's
    temporary folder (T2) is removed by the next build of that fingerprint."""
    data, cache = alpaca_file(tmp_path / "d.jsonl", 300), tmp_path / "c"
    fp = corpus.fingerprint(load_config(overrides=[f"data.dataset={data}"]), tokenizer)
    (cache / f".tmp-{fp}-999999999").mkdir(parents=True)  # a build killed -9
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()

    def one():
        rows, report = build(tokenizer, data, cache)
        out.put((len(rows), rows.content_sha256(), report["built_by"]["pid"]))
    procs = [ctx.Process(target=one) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [out.get(timeout=5) for _ in procs]
    assert results[0] == results[1] and results[0][2] in {p.pid for p in procs}  # one build, shared
    assert sorted(p.name for p in cache.iterdir()) == [".locks", fp]


def test_a_full_disk_is_one_line_naming_the_cache_folder(tmp_path, tokenizer):
    """T4: writing the cache fails (here a file-size limit: EFBIG, the same path as ENOSPC): a RunFault
    naming the cache folder, no temporary folder left, nothing published."""
    import resource

    data, cache = alpaca_file(tmp_path / "d.jsonl", 400), tmp_path / "c"
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()

    def one():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        try:
            build(tokenizer, data, cache)
            out.put("built")
        except RunFault as exc:
            out.put(str(exc))
    proc = ctx.Process(target=one)
    proc.start()
    proc.join(120)
    message = out.get(timeout=5)
    assert message.startswith(f"data.cache_dir: cannot write the tokenized-data cache {cache}/"), message
    assert "File too large" in message and "\n" not in message
    assert [p.name for p in cache.iterdir()] == [".locks"]


def test_workers_end_quietly_when_their_parent_is_killed(tmp_path, tokenizer, monkeypatch, trainer_signals):
    """kill -9 of the building process: its workers see the end of their pipe and exit within seconds,
    printing nothing (they printed BrokenPipeError tracebacks; with a parent's pipe end inherited they
    would wait for ever)."""
    tok, batches = tokenizers(tokenizer, alpaca_file(tmp_path / "a.jsonl", 400), monkeypatch)
    ctx = multiprocessing.get_context("fork")
    pids, log = ctx.Queue(), tmp_path / "stderr.txt"

    def parent():
        fd = os.open(log, os.O_WRONLY | os.O_CREAT)
        os.dup2(fd, 2)
        with tok:
            for i, _ in enumerate(tok.map(batches)):
                if i == 1:
                    pids.put([p.pid for p in tok.pool.procs])
                    time.sleep(600)
    proc = ctx.Process(target=parent)
    proc.start()
    workers = pids.get(timeout=60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)

    def running(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except FileNotFoundError:
            return False
    deadline = time.monotonic() + 10
    while any(running(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(running(p) for p in workers)
    assert log.read_text() == ""
