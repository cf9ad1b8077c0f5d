"""The serving engine: continuous batching of greedy and sampled sequences over one slot-based KV cache, and beam
requests batched among themselves through `generate/decode.py`'s beam search. One thread runs the model.

The slot cache holds `max_batch` rows of `capacity` positions. The running sequences hold rows 0..n-1 and one
step feeds each of them one token through a KVCache view of those rows (free rows cost nothing). All rows share
the write position L, because the model's forward appends at `cache.length` for the whole batch. A sequence joins
with a prefill of its own (batch 1: what `generate` computes for that prompt alone) copied into the W columns just
before L of a free row; the columns before them are padding in a span of their own, which nothing attends to.
Only distances within a segment reach the position bias (across segments the bias is per segment pair), so
where a sequence sits in its row does not change what it computes, and a sequence decodes to the ids `generate`
gives its prompt alone. When a longer prompt joins, the rows move right until L >= W; when L reaches the
capacity, all rows move left by the padding they all have (at least `slack` columns, as no sequence is longer
than `max_length`). A sequence that ends or is cancelled leaves at once: the last row moves into its place.

Tokens are chosen per row exactly as decode.py's loops choose them (first-step ban, repetition penalty,
argmax, or the top-k / top-p filter and a draw from the request's own torch.Generator).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from cpmctl import CpmctlError
from cpmctl.generate.decode import apply_repetition_penalty, beam_search, top_k_top_p_filter
from cpmctl.generate.step import DecodeStep, covers
from cpmctl.model.ant import CPMAnt, KVCache
from cpmctl.model.generation_config import GenerationConfig
from cpmctl.model.inputs import TEXT_SEGMENT, build_inputs
from cpmctl.model.tokenizer import EOS, NEWLINE, CPMAntTokenizer
from cpmctl.serve.slots import SlotCache

@dataclass(frozen=True)
class Limits:
    """What one engine accepts: rows decoded at once, requests waiting beyond them, prompt and output caps."""

    max_batch: int = 8
    max_queue: int = 64
    max_prompt_tokens: int = 1024  # <s> + the prompt's tokens (the 32 prompt slots not counted)
    max_new_tokens: int = 512

    def check(self) -> None:
        for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise CpmctlError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def max_length(prompt_length: int, limits: Limits) -> int:
    """Positions one sequence can fill: prompt slots, prompt, and the generated tokens fed back (beam search's
    limit + 2 at most)."""
    return prompt_length + limits.max_prompt_tokens + limits.max_new_tokens + 3


def cache_capacity(prompt_length: int, limits: Limits) -> int:
    """Slot-cache positions: one sequence's maximum plus a quarter as slack, so the rows move left at most once
    every `slack` steps."""
    longest = max_length(prompt_length, limits)
    return longest + max(64, longest // 4)


@dataclass
class Event:
    """What a sequence reports, from the engine thread: `text` (a new piece), `done` (with finish_reason) or
    `error` (with a message)."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    message: str | None = None


class QueueFull(Exception):
    """The queue of waiting requests is full (HTTP 503)."""


class ShuttingDown(Exception):
    """The engine no longer takes requests."""


@dataclass(eq=False)
class Sequence:
    """One prompt's decoding. `on_event` is called from the engine thread."""

    prompt_ids: list[int]
    cfg: GenerationConfig
    stop: tuple[str, ...] = ()
    on_event: Callable[[Event], None] | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None
    generator: torch.Generator | None = None
    _sent: int = 0  # characters of `text` already reported

    def cancel(self) -> None:
        """Any thread: the engine drops the sequence at its next step."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)


class Engine:
    """Continuous batching on one model. `submit` from any thread; `start` runs the loop in a thread of its own."""

    def __init__(self, model: CPMAnt, tokenizer: CPMAntTokenizer, limits: Limits = Limits(),
                 capacity: int | None = None):
        """`capacity`: slot-cache positions (default cache_capacity; at least one sequence's max_length)."""
        limits.check()
        self.model, self.tokenizer, self.limits = model.eval(), tokenizer, limits
        self.device = model.input_embedding.weight.device
        self.prompt_length = model.config.prompt_length
        self.max_length = max_length(self.prompt_length, limits)
        capacity = capacity or cache_capacity(self.prompt_length, limits)
        if capacity <= self.max_length:
            raise CpmctlError(f"a slot cache of {capacity} positions cannot hold a sequence of {self.max_length}")
        self.slots = SlotCache(model, limits.max_batch, capacity)
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()  # greedy and sampling, FIFO
        self._beams: deque[Sequence] = deque()
        self._active: list[Sequence] = []  # row r of the slot cache is _active[r]
        self._logits: torch.Tensor | None = None  # (len(_active), vocab): the next token's logits of each row
        self._running_beams = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (a step advances every running sequence by one token)
        # generate/step.py's DecodeStep where it covers the model (the forward's logits bit for bit, less per-step work)
        self._fast_step = DecodeStep(self.model) if covers(self.model) else None

    # ----- any thread -------------------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._beams)

    @property
    def running(self) -> int:
        return len(self._active) + self._running_beams

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences together (all or none): QueueFull when they do not fit the queue."""
        for seq in seqs:
            self.check_sequence(seq)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self.waiting + len(seqs) > self.limits.max_queue:
                raise QueueFull(f"{self.waiting} requests are waiting (--max-queue {self.limits.max_queue})")
            for seq in seqs:
                if seq.cfg.decode == "sample":
                    seq.generator = torch.Generator(device=self.device)
                    seq.generator.manual_seed(seq.cfg.seed if seq.cfg.seed is not None else torch.seed())
                (self._beams if seq.cfg.decode == "beam" else self._waiting).append(seq)
            self._cond.notify()

    def check_sequence(self, seq: Sequence) -> None:
        """The limits a sequence must meet (the HTTP layer checks them first, naming the request field)."""
        if not seq.prompt_ids:
            raise CpmctlError("empty prompt")
        if len(seq.prompt_ids) > self.limits.max_prompt_tokens:
            raise CpmctlError(f"prompt of {len(seq.prompt_ids)} tokens is over --max-prompt-tokens "
                              f"{self.limits.max_prompt_tokens}")
        if seq.cfg.max_new_tokens > self.limits.max_new_tokens:
            raise CpmctlError(f"max_new_tokens {seq.cfg.max_new_tokens} is over --max-tokens {self.limits.max_new_tokens}")
        if seq.cfg.decode == "beam" and seq.cfg.beam_size > self.limits.max_batch:
            raise CpmctlError(f"beam_size {seq.cfg.beam_size} is over --max-batch {self.limits.max_batch}")

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="cpmctl-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop taking requests, finish the ones queued and running, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    # ----- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self._cond:
                    while not (self._waiting or self._beams or self._active or self._stopping):
                        self._cond.wait()
                    if self._stopping and not (self._waiting or self._beams or self._active):
                        return
                    free = self.limits.max_batch - len(self._active)
                    joiners = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                    beams = self._beam_group()
                try:
                    self._iteration(joiners, beams)
                except Exception as e:  # a bug or out of memory: fail what is in flight, keep serving
                    traceback.print_exc(file=sys.stderr)
                    self._fail_all(joiners + beams, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")

    def _beam_group(self) -> list[Sequence]:
        """The first waiting beam request and those with the same settings, as many as fit max_batch rows."""
        if not self._beams:
            return []
        first = self._beams[0]
        size = max(1, self.limits.max_batch // first.cfg.beam_size)
        group = [s for s in self._beams if s.cfg == first.cfg][:size]
        for s in group:
            self._beams.remove(s)
        self._running_beams = len(group)
        return group

    def _iteration(self, joiners: list[Sequence], beams: list[Sequence]) -> None:
        if beams:
            self._run_beams(beams)
        self._drop(lambda s: s.cancelled, "cancelled")
        for seq in joiners:
            if seq.cancelled:
                self._finish(seq, "cancelled")
            else:
                self._join(seq)
        if not self._active:
            return
        tokens = self._choose(self._logits)
        for seq, token in zip(self._active, tokens):
            self._advance(seq, token)
        self._drop(lambda s: s.done, None)
        if self._active:  # a sequence still running appended its token
            last = torch.tensor([s.tokens[-1] for s in self._active], dtype=torch.long, device=self.device)
            self._logits = self._step(last)

    def _join(self, seq: Sequence) -> None:
        inputs = build_inputs(self.model, [seq.prompt_ids])
        width = inputs["input"].shape[1]
        prefill = KVCache.allocate(self.model, 1, width)
        logits = self.model(inputs["input"], inputs["segment"], inputs["context"], inputs["span"], cache=prefill,
                            last_only=True)[:, -1].float()
        n = len(self._active)
        if n == 0:
            self.slots.length = width
        elif self.slots.length < width:
            self.slots.shift(n, width - self.slots.length)
        self.slots.place(n, prefill, width)
        self._active.append(seq)
        self._logits = logits if n == 0 else torch.cat([self._logits, logits])

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        n = len(self._active)
        if self.slots.length == self.slots.capacity:
            self.slots.shift(n, -min(self.slots.start[:n]))
        cache = self.slots.view(n)
        segment = torch.full((n, 1), TEXT_SEGMENT, dtype=torch.long, device=self.device)
        context = torch.zeros(n, 1, dtype=torch.bool, device=self.device)
        span = torch.zeros_like(segment)
        if self._fast_step is not None:
            logits = self._fast_step(cache, tokens, segment, context, span)
        else:
            logits = self.model(tokens[:, None], segment, context, span, cache=cache)[:, -1]
        self.slots.length = cache.length
        self.steps += 1
        return logits.float()

    def _choose(self, logits: torch.Tensor) -> list[int]:
        """Each row's next token, as decode.greedy / decode.sample choose it for that sequence alone."""
        for r, seq in enumerate(self._active):
            cfg = seq.cfg
            if not seq.tokens and cfg.bans_first_step:  # decode._ban_first
                logits[r, EOS] = float("-inf")
                logits[r, NEWLINE] = float("-inf")
            if cfg.repetition_penalty != 1.0 and seq.tokens:
                history = torch.tensor([seq.tokens], dtype=torch.long, device=self.device)
                logits[r : r + 1] = apply_repetition_penalty(logits[r : r + 1], history, cfg.repetition_penalty,
                                                             cfg.repetition_window)
        chosen = logits.argmax(-1).tolist()
        for r, seq in enumerate(self._active):
            if seq.cfg.decode == "sample":
                cfg = seq.cfg
                row = top_k_top_p_filter(logits[r : r + 1] / cfg.temperature, cfg.top_k, cfg.top_p)
                chosen[r] = int(torch.multinomial(F.softmax(row, dim=-1), 1, generator=seq.generator)[0, 0])
        return chosen

    def _advance(self, seq: Sequence, token: int) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        if token == EOS:
            self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        piece = self.tokenizer.decode([token])
        seq.text += piece
        if seq.stop and self._apply_stop(seq, len(piece)):
            self._finish(seq, "stop")
        elif len(seq.tokens) >= seq.cfg.max_new_tokens:
            self._finish(seq, "length")
        else:
            self._report(seq, final=False)

    @staticmethod
    def _apply_stop(seq: Sequence, new_chars: int) -> bool:
        """Cut the text before the first stop string it now holds; True when it does."""
        longest = max(len(s) for s in seq.stop)
        start = max(0, len(seq.text) - new_chars - longest + 1)
        found = [i for i in (seq.text.find(s, start) for s in seq.stop) if i >= 0]
        if not found:
            return False
        seq.text = seq.text[: min(found)]
        return True

    def _report(self, seq: Sequence, final: bool) -> None:
        """The text not yet reported, less a tail that may be the start of a stop string."""
        end = len(seq.text)
        if not final and seq.stop:
            for k in range(min(end - seq._sent, max(len(s) for s in seq.stop) - 1), 0, -1):
                if any(s.startswith(seq.text[end - k :]) for s in seq.stop):
                    end -= k
                    break
        if end > seq._sent:
            piece, seq._sent = seq.text[seq._sent : end], end
            seq._emit(Event("text", text=piece))

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.finished_at = time.monotonic()
        if reason != "cancelled":
            self._report(seq, final=True)
        seq._emit(Event("done", finish_reason=reason))

    def _drop(self, leaving: Callable[[Sequence], bool], reason: str | None) -> None:
        """Rows whose sequence leaves (finished with `reason` when given): the last row moves into each hole."""
        r = 0
        while r < len(self._active):
            seq = self._active[r]
            if not leaving(seq):
                r += 1
                continue
            if reason is not None:
                self._finish(seq, reason)
            last = len(self._active) - 1
            if r != last:
                self.slots.move(last, r)
                self._active[r] = self._active[last]
                self._logits[r] = self._logits[last]
            self._active.pop()
            self._logits = self._logits[: len(self._active)]
        if not self._active:
            self.slots.length = 0

    def _run_beams(self, group: list[Sequence]) -> None:
        try:
            live = [s for s in group if not s.cancelled]
            for s in group:
                if s.cancelled:
                    self._finish(s, "cancelled")
            if not live:
                return
            ids = beam_search(self.model, build_inputs(self.model, [s.prompt_ids for s in live]), live[0].cfg)
            for seq, tokens in zip(live, ids):
                seq.first_token_at = time.monotonic()
                seq.tokens = tokens
                seq.text = self.tokenizer.decode(tokens)
                stopped = bool(seq.stop) and self._apply_stop(seq, len(seq.text))
                # As in `generate`, a hypothesis cut by the limit may hold max_new_tokens + 1 tokens.
                self._finish(seq, "stop" if stopped or len(tokens) < seq.cfg.max_new_tokens else "length")
        finally:
            self._running_beams = 0

    def _fail_all(self, extra: list[Sequence], message: str) -> None:
        for seq in self._active + extra:
            if not seq.done:
                seq.finish_reason = "error"
                seq.finished_at = time.monotonic()
                seq._emit(Event("error", message=message))
        self._active, self._logits, self._running_beams = [], None, 0
        self.slots.length = 0
