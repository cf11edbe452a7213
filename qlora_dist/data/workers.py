"""Forked worker processes that map batches in order and always end: the tokenized-data cache's pool.

Why not multiprocessing.Pool (Python 3.11): its workers share one task queue guarded by one lock, and
`terminate()` first takes that lock itself (`_help_stuff_finish`) and then SIGTERMs the workers still
waiting on it. Workers forked from the trainer inherited its Python SIGTERM handler (train/preempt.py), so
that SIGTERM was not a plain death: Python runs a handler only between bytecodes, and a signal that lands
just before a worker blocks in the lock's `sem_wait` is consumed with no handler run (CPython's SemLock
checks for signals only after an EINTR), leaving the worker blocked for ever on a lock the parent never
releases, and the parent in `Popen.wait` for it: the random hang of issue 23. A Pool worker killed while
it holds the queue's lock (e.g. by the OOM killer) blocks its siblings the same way, and a task it held is
never answered (`AsyncResult.get` waits for ever).

Here each worker has its own pipe (nothing shared, so no lock to die holding): batch k goes to worker
k % n, one batch in flight per worker, and its result is read back from that pipe, so results come in
order. Workers start with default signal handling (SIGTERM/SIGUSR1/SIGUSR2 are a plain death, and print
nothing; SIGINT is ignored: Ctrl-C is the trainer's to act on); a worker that dies is seen through its sentinel at once and named in the error; at the end
each gets a stop message and is joined within a bound, then terminated, then killed.
"""
from __future__ import annotations

import multiprocessing
import signal
from multiprocessing.connection import wait
from typing import Callable, Iterator

from qlora_dist.errors import RunFault

# The signals the trainer handles (train/preempt.SIGNALS): a worker must not run the trainer's handler.
WORKER_DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
JOIN_S = 10.0  # how long a worker that was told to stop may take to exit before it is terminated


def _worker_main(conn, work: Callable, args: tuple, inherited: list) -> None:
    """A worker's loop: a batch in, its result out, until the stop message (None) or the parent is gone.
    Signals were blocked across the fork: default handling is set before they can arrive, except that
    Ctrl-C (SIGINT, sent to the whole terminal's process group) is the trainer's to act on: it ends the
    pool itself, and a worker dying of it first would be reported as a lost batch instead."""
    for sig in WORKER_DEFAULT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN if sig == signal.SIGINT else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_DEFAULT_SIGNALS)
    for other in inherited:  # the parent's ends (this pipe's, earlier workers'): held here, no EOF would
        # come when the parent dies
        other.close()
    while True:
        try:
            task = conn.recv()
            if task is None:
                return
            try:
                result = (True, work(task, *args))
            except Exception as exc:  # a bug in `work`: the parent raises it, with this worker's text
                result = (False, f"{type(exc).__name__}: {exc}")
            conn.send(result)
        except (EOFError, OSError):  # the parent is gone (killed): end quietly, no BrokenPipeError trace
            return


class WorkerPool:
    """`n` forked workers running `work(batch, *args)`; `map` keeps one batch in flight per worker."""

    def __init__(self, n: int, work: Callable, args: tuple, what: str = "worker"):
        ctx = multiprocessing.get_context("fork")  # the workers inherit `args` (a tokenizer) unpickled
        self.what, self.procs, self.conns = what, [], []
        for _ in range(n):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(theirs, work, args, [*self.conns, mine]), daemon=True)
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_DEFAULT_SIGNALS)
            try:
                proc.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            theirs.close()
            self.procs.append(proc)
            self.conns.append(mine)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(graceful=exc_type is None)  # on an error, workers may be mid-batch: end them at once

    def map(self, batches: Iterator) -> Iterator:
        """Each batch's result, in order."""
        n, sent = len(self.procs), 0
        for batch in batches:
            if sent >= n:
                yield self._result(sent - n)
            try:
                self.conns[sent % n].send(batch)
            except OSError:
                raise self._died(self.procs[sent % n]) from None
            sent += 1
        for k in range(max(0, sent - n), sent):
            yield self._result(k)

    def _result(self, k: int):
        conn, proc = self.conns[k % len(self.procs)], self.procs[k % len(self.procs)]
        try:
            if conn not in wait([conn, proc.sentinel]):
                raise EOFError
            ok, value = conn.recv()
        except (EOFError, OSError):  # it died before answering: its batch is lost, so is the build
            raise self._died(proc) from None
        if not ok:
            raise RuntimeError(f"{self.what} process {proc.pid}: {value}")
        return value

    def _died(self, proc) -> RunFault:
        proc.join(JOIN_S)
        return RunFault(f"a {self.what} process (pid {proc.pid}) died with exit code {proc.exitcode} "
                        "(killed, e.g. for memory?) before returning its batch")

    def close(self, graceful: bool = True) -> None:
        """Every worker ended, every join bounded: a stop message and JOIN_S to exit (graceful), then
        SIGTERM (a plain death here) and JOIN_S, then SIGKILL."""
        stops = [lambda p: p.terminate(), lambda p: p.kill()]
        if graceful:
            for conn in self.conns:
                try:
                    conn.send(None)
                except OSError:  # that worker is gone already
                    pass
            stops.insert(0, lambda p: None)
        for stop in stops:
            for proc in self.procs:
                if proc.exitcode is None:
                    stop(proc)
                    proc.join(JOIN_S)
        for conn in self.conns:
            conn.close()

    def exit_codes(self) -> list[int | None]:
        return [p.exitcode for p in self.procs]
