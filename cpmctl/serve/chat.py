"""`cpmctl chat`: a conversation with a served model in the terminal, on the same engine and template as
`/v1/chat/completions`. The session keeps the history within the context window (the oldest turns dropped
first), and reads three commands: `/reset`, `/settings [key=value ...]`, `/exit`. Settings are the request
fields of the HTTP API (checked by the same code), plus `system`."""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Callable

from cpmctl import CpmctlError
from cpmctl.generate.decode import encode_prompt
from cpmctl.serve import chat_template, protocol
from cpmctl.serve.engine import Engine, Event, Sequence

SETTING_KEYS = ("decode", "temperature", "top_p", "top_k", "repetition_penalty", "repetition_window", "beam_size",
                "max_tokens", "seed", "stop", "system")
_INTS = {"top_k", "beam_size", "max_tokens", "seed", "repetition_window"}
_FLOATS = {"temperature", "top_p", "repetition_penalty"}


class EndChat(Exception):
    """/exit"""


@dataclass
class Turn:
    reply: str
    finish_reason: str
    completion_tokens: int
    prompt_tokens: int
    dropped: int  # earlier messages dropped to fit the context window


class ChatSession:
    def __init__(self, engine: Engine, settings: dict | None = None):
        self.engine = engine
        self.history: list[tuple[str, str]] = []
        self.settings: dict = {}
        self.update(settings or {})

    # ----- commands ---------------------------------------------------------------------------------------------
    def command(self, line: str) -> str:
        """Run a /command; returns what to show. CpmctlError for a bad one, EndChat for /exit."""
        name, _, rest = line.strip().partition(" ")
        if name in ("/exit", "/quit"):
            raise EndChat()
        if name == "/reset":
            self.history = []
            return "history cleared"
        if name == "/settings":
            rest = rest.strip()
            if rest.startswith("system="):  # the system message is the rest of the line, spaces included
                self.update({"system": rest.removeprefix("system=") or None})
            elif rest:
                self.update(dict(self._pair(p) for p in rest.split()))
            shown = {k: v for k, v in self.settings.items() if v is not None}
            return "settings: " + (", ".join(f"{k}={v}" for k, v in shown.items()) or "defaults")
        raise CpmctlError(f"unknown command '{name}' (known: /reset, /settings key=value, /exit)")

    @staticmethod
    def _pair(item: str) -> tuple[str, object]:
        key, eq, value = item.partition("=")
        if not eq:
            raise CpmctlError(f"/settings takes key=value pairs, got '{item}'")
        if key not in SETTING_KEYS:
            raise CpmctlError(f"unknown setting '{key}' (known: {', '.join(SETTING_KEYS)})")
        if value in ("", "none", "null"):
            return key, None
        try:
            return key, int(value) if key in _INTS else float(value) if key in _FLOATS else value
        except ValueError:
            raise CpmctlError(f"setting '{key}' must be a number, got '{value}'") from None

    def update(self, changes: dict) -> None:
        """Apply settings, checked as the HTTP API checks a request (a bad one leaves the settings as they were)."""
        merged = {**self.settings, **changes}
        self._decoding(merged)
        self.settings = merged

    def _decoding(self, settings: dict) -> protocol.Decoding:
        body = {k: v for k, v in settings.items() if k != "system" and v is not None}
        try:
            return protocol.decoding(body, max_tokens_cap=self.engine.limits.max_new_tokens,
                                     default_max_tokens=self.engine.limits.max_new_tokens,
                                     max_batch=self.engine.limits.max_batch)
        except protocol.RequestError as e:
            raise CpmctlError(f"setting {e.message}") from None

    # ----- a turn -----------------------------------------------------------------------------------------------
    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> Turn:
        """The model's reply to `text`, streamed to `on_text`; the turn joins the history once it is complete."""
        if not text.strip():
            raise CpmctlError("empty message")
        dec = self._decoding(self.settings)
        tokenizer, limit = self.engine.tokenizer, self.engine.limits.max_prompt_tokens
        system = [("system", self.settings["system"])] if self.settings.get("system") else []
        count = lambda prompt: len(encode_prompt(tokenizer, prompt))  # noqa: E731
        messages = chat_template.fit(system + self.history + [("user", text)], count, limit)
        ids = encode_prompt(tokenizer, chat_template.render(messages))
        if len(ids) > limit:
            raise CpmctlError(f"the message is {len(ids)} tokens with the template, over --max-prompt-tokens {limit}")
        dropped = len(system) + len(self.history) + 1 - len(messages)
        events: queue.Queue[Event] = queue.Queue()
        seq = Sequence(ids, dec.cfg, chat_template.STOP + dec.stop, events.put)
        self.engine.submit([seq])
        try:
            while True:
                event = events.get()
                if event.kind == "text" and on_text is not None:
                    on_text(event.text)
                elif event.kind == "error":
                    raise CpmctlError(f"decoding failed: {event.message}")
                elif event.kind == "done":
                    break
        except BaseException:
            seq.cancel()  # Ctrl-C: the reply stops; the turn is not kept
            raise
        self.history = [m for m in messages if m[0] != "system"] + [("assistant", seq.text)]
        return Turn(seq.text, seq.finish_reason, len(seq.tokens), len(ids), dropped)
