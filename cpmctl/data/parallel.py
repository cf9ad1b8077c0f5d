"""An ordered, bounded process-pool map: the data commands do their per-chunk work (parsing, hashing, filtering,
tokenizing) in worker processes while a single consumer makes every decision in input order.

One pool serves a whole run (every input file), so workers start once and stay busy across file boundaries;
work items are large blocks of raw bytes (data/textio.py `read_blocks`), one pickled string each way, so the
main process only reads, dispatches and writes. An `InOrder` item is not sent to a worker: it comes back to the
consumer in its place in the stream (journal replays, end-of-file bookkeeping).

Not multiprocessing.Pool: its worker-handler thread also waits on the shared result pipe, so while a multi-MB
result sits there unread it wakes in a loop (0.44 of the main process's 2.7 CPU s in a 1 GB dedup, and GIL
contention for the rest). Here item i goes to worker i mod N over that worker's own pipes, so results are read
in order straight from the worker that has the next one: no shared queue, no handler threads but one sender."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
import threading
from collections import deque
from multiprocessing.connection import wait
from typing import Callable, Iterable, Iterator

from cpmctl import CpmctlError
from cpmctl.outputs import die_with_parent


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class InOrder:
    """A stream item for the consumer itself: yielded as (item, None) after everything before it."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _serve(fn: Callable, tasks, results, parent: int, inherited: list, initializer: Callable | None,
           initargs: tuple) -> None:
    """A worker: fn over the items on `tasks` until None, each answer (True, result) or (False, exception) on
    `results`. It dies with the command that started it (a killed command leaves no worker behind)."""
    die_with_parent(signal.SIGKILL, parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the command's to handle; it then stops the workers
    for conn in inherited:  # the other ends, and other workers' pipes: a worker's exit must close its pipes
        conn.close()
    failed = None
    if initializer is not None:
        try:
            initializer(*initargs)
        except Exception as error:  # noqa: BLE001 - the answer to every item, so the command names it
            failed = error
    while True:
        try:
            item = pickle.loads(tasks.recv_bytes())
        except EOFError:  # the command closed its end without a goodbye: it is stopping
            return
        if item is None:
            return
        try:
            if failed is not None:
                raise failed
            answer = pickle.dumps((True, fn(item)), pickle.HIGHEST_PROTOCOL)
        except Exception as error:  # noqa: BLE001 - handed to the consumer, raised there in order
            answer = _pickled_error(error)
        results.send_bytes(answer)


def _pickled_error(error: Exception) -> bytes:
    """(False, error), pickled so that it also unpickles (an exception class with its own __init__ arguments may
    not): otherwise a RuntimeError that still names it."""
    try:
        answer = pickle.dumps((False, error), pickle.HIGHEST_PROTOCOL)
        pickle.loads(answer)
        return answer
    except Exception:  # noqa: BLE001
        return pickle.dumps((False, RuntimeError(f"{type(error).__name__}: {error}")))


def _widen(conn) -> int:
    """Make a pipe as large as the system allows (Linux: 1 MB unprivileged) and return its size in bytes (0 when
    unknown). A worker's answer that fits goes into the pipe at once, so the worker starts its next item while the
    consumer is still busy with an earlier one (at the default 64 KB it would wait for the consumer to read it)."""
    try:
        import fcntl

        with open("/proc/sys/fs/pipe-max-size") as f:
            fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, int(f.read()))
        return fcntl.fcntl(conn.fileno(), fcntl.F_GETPIPE_SZ)
    except (ImportError, AttributeError, OSError, ValueError):
        return 0  # not Linux, or not allowed: a smaller pipe is only slower


class _Pool:
    """N workers, each with a task pipe and a result pipe. The consumer sends a task itself when it is sure to fit
    in the pipe (a send that blocked while the worker waits for the consumer to read its answer would never
    end); a larger one goes through a sender thread, started the first time one comes."""

    def __init__(self, fn: Callable, workers: int, initializer: Callable | None, initargs: tuple):
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        forked = ctx.get_start_method() == "fork"
        pipes = [(ctx.Pipe(duplex=False), ctx.Pipe(duplex=False)) for _ in range(workers)]
        self.procs, self.tasks, self.results, rooms = [], [], [], []
        for i, ((task_r, task_w), (result_r, result_w)) in enumerate(pipes):
            others = [c for j, (a, b) in enumerate(pipes) for c in (*a, *b) if j != i] + [task_w, result_r]
            proc = ctx.Process(target=_serve, daemon=True, name=f"cpmctl-worker-{i}",
                               args=(fn, task_r, result_w, os.getpid(), others if forked else [], initializer,
                                     initargs))
            _widen(result_r)
            rooms.append(_widen(task_w) - 64)  # 64: message headers; 0 or less: every task via the sender
            proc.start()
            task_r.close()
            result_w.close()
            self.procs.append(proc)
            self.tasks.append(task_w)
            self.results.append(result_r)
        self.room = min(rooms)
        self._unread = [deque() for _ in range(workers)]  # sizes of the tasks each worker may not have read yet
        self._via_sender = [0] * workers  # tasks handed to the sender and not yet sent, per worker
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue | None = None
        self._sender: threading.Thread | None = None

    def submit(self, worker: int, item) -> None:
        payload = pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
        unread = self._unread[worker]
        unread.append(len(payload))
        with self._lock:
            direct = not self._via_sender[worker] and sum(unread) <= self.room
            if not direct:
                self._via_sender[worker] += 1
        if direct:
            try:
                self.tasks[worker].send_bytes(payload)
            except OSError:  # its end of the pipe is closed: it died
                raise self._died(worker) from None
            return
        if self._sender is None:
            self._outbox = queue.SimpleQueue()
            self._sender = threading.Thread(target=self._send_all, name="cpmctl-pool-sender", daemon=True)
            self._sender.start()
        self._outbox.put((worker, payload))

    def _send_all(self) -> None:
        while (job := self._outbox.get()) is not None:
            worker, payload = job
            try:
                self.tasks[worker].send_bytes(payload)
            except OSError:  # the worker is gone: the consumer finds out from its result pipe
                return
            with self._lock:
                self._via_sender[worker] -= 1

    def result(self, worker: int):
        conn, proc = self.results[worker], self.procs[worker]
        if not conn.poll():
            wait([conn, proc.sentinel])
        try:
            ok, value = pickle.loads(conn.recv_bytes())
        except EOFError:
            raise self._died(worker) from None
        self._unread[worker].popleft()  # it answered, so it has read that task
        if not ok:
            raise value
        return value

    def _died(self, worker: int) -> CpmctlError:
        proc = self.procs[worker]
        proc.join(1)
        return CpmctlError(f"data worker {worker} died (exit code {proc.exitcode}) before it answered")

    def close(self, finished: bool) -> None:
        """Stop the workers: asked to when every result came back, killed otherwise (an error, or a consumer
        that stopped early)."""
        if self._sender is not None:
            self._outbox.put(None)
            if finished:
                self._sender.join()
        for i, proc in enumerate(self.procs):
            if finished:
                try:
                    self.tasks[i].send_bytes(pickle.dumps(None))
                except OSError:
                    proc.kill()
            else:
                proc.kill()
        for proc in self.procs:
            proc.join()
        for conn in self.tasks + self.results:
            conn.close()


def ordered_map(
    fn: Callable,
    items: Iterable,
    workers: int = 1,
    initializer: Callable | None = None,
    initargs: tuple = (),
    window: int | None = None,
) -> Iterator:
    """(item, fn(item)) pairs in input order. With workers > 1 the calls run in `workers` processes with at most
    `window` items in flight, so memory stays bounded however long `items` is."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield item, None if isinstance(item, InOrder) else fn(item)
        return
    # Four items a worker: 3-12% faster than two in three A/B pairs of a 1 GB dedup on 2 cores (the consumer and
    # the workers take turns on the same cores; a deeper queue rides out the gaps).
    window = window or 4 * workers + 1
    pool = _Pool(fn, workers, initializer, initargs)
    pending: deque = deque()  # (item, worker or None for InOrder)
    sent = 0
    finished = False
    try:
        for item in items:
            if isinstance(item, InOrder):
                pending.append((item, None))
            else:
                pool.submit(sent % workers, item)
                pending.append((item, sent % workers))
                sent += 1
            while pending and (len(pending) >= window or pending[0][1] is None):
                done, worker = pending.popleft()
                yield done, None if worker is None else pool.result(worker)
        while pending:
            done, worker = pending.popleft()
            yield done, None if worker is None else pool.result(worker)
        finished = True
    finally:
        pool.close(finished)
