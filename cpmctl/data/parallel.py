"""An ordered, bounded process-pool map: the data commands do their per-chunk work (parsing, hashing, filtering,
tokenizing) in worker processes while a single consumer makes every decision in input order.

One pool serves a whole run (every input file), so workers start once and stay busy across file boundaries;
work items are large blocks of raw bytes (data/textio.py `read_blocks`), one pickled string each way, so the
main process only reads, dispatches and writes. An `InOrder` item is not sent to a worker: it comes back to the
consumer in its place in the stream (journal replays, end-of-file bookkeeping)."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from typing import Callable, Iterable, Iterator

from cpmctl.outputs import die_with_parent


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class InOrder:
    """A stream item for the consumer itself: yielded as (item, None) after everything before it."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _start_worker(parent: int, initializer: Callable | None, initargs: tuple) -> None:
    """Workers die with the command that started them (a killed command leaves no worker behind)."""
    die_with_parent(signal.SIGKILL, parent)
    if initializer is not None:
        initializer(*initargs)


def ordered_map(
    fn: Callable,
    items: Iterable,
    workers: int = 1,
    initializer: Callable | None = None,
    initargs: tuple = (),
    window: int | None = None,
) -> Iterator:
    """(item, fn(item)) pairs in input order. With workers > 1 the calls run in one process pool with at most
    `window` items in flight, so memory stays bounded however long `items` is (Pool.imap would read ahead without
    limit)."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield item, None if isinstance(item, InOrder) else fn(item)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    window = window or 2 * workers + 1
    pool = ctx.Pool(workers, initializer=_start_worker, initargs=(os.getpid(), initializer, initargs))
    pending: deque = deque()
    try:
        for item in items:
            pending.append((item, None if isinstance(item, InOrder) else pool.apply_async(fn, (item,))))
            while pending and (len(pending) >= window or pending[0][1] is None):
                done, result = pending.popleft()
                yield done, None if result is None else result.get()
        while pending:
            done, result = pending.popleft()
            yield done, None if result is None else result.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()
