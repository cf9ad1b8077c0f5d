"""The slot cache of the serving engine: KV cache rows that share one write position, with the moves continuous
batching needs (engine.py's docstring says why they keep every sequence's results): a prefilled sequence placed
at the end of a row, all rows moved right (a longer prompt joins) or left (dropping the padding they all have),
and one row copied over another (a sequence leaves)."""

from __future__ import annotations

from cpmctl.model.ant import CPMAnt, KVCache
from cpmctl.model.inputs import PROMPT_SEGMENT

PAD_SPAN = 1  # the span of padding columns (live tokens are span 0, as build_inputs lays them out)


class SlotCache:
    """KV cache rows with a shared write position `length`; `start[r]` is row r's first live column."""

    def __init__(self, model: CPMAnt, rows: int, capacity: int):
        self.cache = KVCache.allocate(model, rows, capacity)
        for t in self.cache.k + self.cache.v:
            if t is not None:
                t.zero_()  # padding columns are masked, but 0 * NaN from uninitialised memory would still be NaN
        self.capacity = capacity
        self.length = 0
        self.start = [0] * rows
        self.moves = {"right": 0, "left": 0}  # how often the rows moved (tests, benchmarks)

    def _kv(self):
        return [t for t in self.cache.k + self.cache.v if t is not None]

    def _meta(self):
        return [self.cache.segment, self.cache.context, self.cache.span]

    def view(self, n: int) -> KVCache:
        """The first n rows as a KVCache at the shared position (slices: the forward writes into this cache)."""
        c = self.cache
        rows = lambda ts: [t[:n] if t is not None else None for t in ts]  # noqa: E731
        return KVCache(rows(c.k), rows(c.v), c.segment[:n], c.context[:n], c.span[:n], self.length)

    def _pad(self, rows: slice | int, cols: slice) -> None:
        self.cache.segment[rows, cols] = PROMPT_SEGMENT
        self.cache.context[rows, cols] = True
        self.cache.span[rows, cols] = PAD_SPAN

    def shift(self, n: int, delta: int) -> None:
        """Move rows 0..n-1 right (delta > 0: padding in front) or left (delta < 0: dropping shared padding)."""
        old = self.length
        new = old + delta
        if delta > 0:
            src, dst = slice(0, old), slice(delta, new)
        else:
            src, dst = slice(-delta, old), slice(0, new)
        for t in self._kv():
            t[:n, :, dst] = t[:n, :, src].clone()
        for t in self._meta():
            t[:n, dst] = t[:n, src].clone()
        if delta > 0:
            self._pad(slice(0, n), slice(0, delta))
        for r in range(n):
            self.start[r] += delta
        self.length = new
        self.moves["right" if delta > 0 else "left"] += 1

    def place(self, row: int, prefill: KVCache, width: int) -> None:
        """A prefilled sequence (`width` positions) into `row`, ending at the shared position."""
        at = slice(self.length - width, self.length)
        for dst, src in zip(self.cache.k + self.cache.v, prefill.k + prefill.v):
            if dst is not None:
                dst[row, :, at] = src[0, :, :width]
        for dst, src in zip(self._meta(), [prefill.segment, prefill.context, prefill.span]):
            dst[row, at] = src[0, :width]
        self._pad(row, slice(0, at.start))
        self.start[row] = at.start

    def move(self, src: int, dst: int) -> None:
        cols = slice(0, self.length)
        for t in self._kv():
            t[dst, :, cols] = t[src, :, cols]
        for t in self._meta():
            t[dst, cols] = t[src, cols]
        self.start[dst] = self.start[src]
