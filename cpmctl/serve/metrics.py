"""`GET /metrics`: the server's counters in the Prometheus text exposition format (version 0.0.4).

requests by endpoint and status, prompt and generated tokens, the queue and the running batch (gauges read at
scrape time), and histograms of request latency and time to the first token.
"""

from __future__ import annotations

import threading
from typing import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound:g}"}} {cumulative}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Updated by the HTTP handlers (any thread); `render` reads the engine's gauges through the callables."""

    def __init__(self, waiting: Callable[[], int], running: Callable[[], int]):
        self._lock = threading.Lock()
        self._waiting, self._running = waiting, running
        self.requests: dict[tuple[str, int], int] = {}
        self.finished: dict[str, int] = {}  # sequences by finish reason (stop, length, cancelled, error)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.latency = Histogram()
        self.first_token = Histogram()

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def sequence(self, reason: str, prompt_tokens: int, generated_tokens: int, latency: float,
                 first_token: float | None) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += generated_tokens
            self.latency.observe(latency)
            if first_token is not None:
                self.first_token.observe(first_token)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP cpmctl_requests_total HTTP requests by endpoint and status code.",
                     "# TYPE cpmctl_requests_total counter"]
            lines += [f'cpmctl_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP cpmctl_sequences_total Decoded sequences (one per prompt) by finish reason.",
                      "# TYPE cpmctl_sequences_total counter"]
            lines += [f'cpmctl_sequences_total{{finish_reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
            for name, value, help_ in (("prompt_tokens", self.prompt_tokens, "Prompt tokens of finished sequences."),
                                       ("generation_tokens", self.generated_tokens, "Tokens generated.")):
                lines += [f"# HELP cpmctl_{name}_total {help_}", f"# TYPE cpmctl_{name}_total counter",
                          f"cpmctl_{name}_total {value}"]
            for name, value, help_ in (("queue_length", self._waiting(), "Requests waiting to join the batch."),
                                       ("running_sequences", self._running(), "Sequences being decoded.")):
                lines += [f"# HELP cpmctl_{name} {help_}", f"# TYPE cpmctl_{name} gauge", f"cpmctl_{name} {value}"]
            for name, hist, help_ in (
                ("request_latency_seconds", self.latency, "Time from arrival to the last token, per sequence."),
                ("time_to_first_token_seconds", self.first_token, "Time from arrival to the first token."),
            ):
                lines += [f"# HELP cpmctl_{name} {help_}", f"# TYPE cpmctl_{name} histogram"] + hist.lines(f"cpmctl_{name}")
        return "\n".join(lines) + "\n"
