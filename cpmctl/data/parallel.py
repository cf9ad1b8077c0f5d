"""An ordered, bounded process-pool map: the data commands do their per-chunk work (parsing, hashing, filtering,
tokenizing) in worker processes while a single consumer makes every decision in input order."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from typing import Callable, Iterable, Iterator

from cpmctl.outputs import die_with_parent


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


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
    """(item, fn(item)) pairs in input order. With workers > 1 the calls run in a process pool with at most `window`
    items in flight, so memory stays bounded however long `items` is (Pool.imap would read ahead without limit)."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield item, fn(item)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    window = window or 2 * workers + 1
    pool = ctx.Pool(workers, initializer=_start_worker, initargs=(os.getpid(), initializer, initargs))
    pending: deque = deque()
    try:
        for item in items:
            pending.append((item, pool.apply_async(fn, (item,))))
            if len(pending) >= window:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()
