"""The OpenAI request bodies, checked field by field: each bad field is a RequestError naming it (HTTP 400 with an
OpenAI-style error object), and a field cpmctl cannot honour is refused rather than ignored.

Decoding: `decode` (greedy | sample | beam, CPM-Ant's own knob) defaults to sampling, or greedy when
`temperature` is 0; `temperature`, `top_p`, `top_k`, `repetition_penalty`, `beam_size` default to
GenerationConfig's values (those of `cpmctl generate`). Nothing in a request names a file.
"""

from __future__ import annotations

from dataclasses import dataclass

from cpmctl import CpmctlError
from cpmctl.model.generation_config import GenerationConfig

DEFAULTS = GenerationConfig()
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class RequestError(Exception):
    """A bad request: HTTP `status` with an OpenAI-style error naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Decoding:
    """What one request asks of the engine (besides its prompt)."""

    cfg: GenerationConfig
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    return_token_ids: bool


# Fields a client may send that change nothing when they hold these values; any other value is refused.
_NEUTRAL = {"n": (1, None), "best_of": (1, None), "echo": (False, None), "logprobs": (None, False, 0),
            "top_logprobs": (None, 0), "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None),
            "logit_bias": (None,), "suffix": (None,), "user": None, "parallel_tool_calls": (None,),
            "tools": (None,), "tool_choice": (None, "none"), "response_format": (None,)}
_DECODING = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "decode",
             "beam_size", "top_k", "repetition_penalty", "repetition_window", "return_token_ids"}
COMPLETION_FIELDS = _DECODING | {"prompt"} | set(_NEUTRAL)
CHAT_FIELDS = _DECODING | {"messages", "max_completion_tokens"} | set(_NEUTRAL)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(body: dict, name: str, check, what: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise RequestError(f"'{name}' must be {what}, got {value!r}"[:300], name)
    return value


def check_fields(body, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unknown field '{unknown[0]}'", unknown[0])
    for name, neutral in _NEUTRAL.items():
        if name in body and neutral is not None and body[name] not in neutral:
            raise RequestError(f"'{name}' = {body[name]!r} is not supported by this server", name)
    if "user" in body and body["user"] is not None and not isinstance(body["user"], str):
        raise RequestError("'user' must be a string", "user")
    return body


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("'model' is required (a string; GET /v1/models lists it)", "model")
    if model != served:
        raise RequestError(f"the model '{model}' does not exist here; this server serves '{served}'", "model",
                           status=404, code="model_not_found")


def decoding(body: dict, *, max_tokens_cap: int, default_max_tokens: int, max_batch: int,
             max_tokens_field: str = "max_tokens") -> Decoding:
    """The decoding settings of a completion or chat request, checked against the server's caps."""
    max_tokens = _get(body, max_tokens_field, lambda v: _is_int(v) and v >= 1, "an integer >= 1",
                      min(default_max_tokens, max_tokens_cap))
    if max_tokens > max_tokens_cap:
        raise RequestError(f"'{max_tokens_field}' is {max_tokens}, over this server's limit of {max_tokens_cap} "
                           "(--max-tokens)", max_tokens_field)
    temperature = _get(body, "temperature", lambda v: _is_number(v) and 0 <= v <= 2, "a number in [0, 2]")
    decode = _get(body, "decode", lambda v: v in ("greedy", "sample", "beam"), "greedy, sample or beam")
    if decode is None:
        decode = "greedy" if temperature == 0 else "sample"
    elif decode == "sample" and temperature == 0:
        raise RequestError("'temperature' must be > 0 for sampling (0 means greedy decoding)", "temperature")
    beam_size = _get(body, "beam_size", lambda v: _is_int(v) and v >= 1, "an integer >= 1", DEFAULTS.beam_size)
    if decode == "beam" and beam_size > max_batch:
        raise RequestError(f"'beam_size' is {beam_size}, over this server's --max-batch {max_batch}", "beam_size")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise RequestError("'stream_options' must be {\"include_usage\": true|false}", "stream_options")
    stream = _get(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
    if options is not None and not stream:
        raise RequestError("'stream_options' is only allowed with 'stream': true", "stream_options")
    _check_applies(body, decode, temperature)
    cfg = GenerationConfig(
        decode=decode,
        beam_size=beam_size,
        top_k=_get(body, "top_k", lambda v: _is_int(v) and v >= 0, "an integer >= 0", DEFAULTS.top_k),
        top_p=float(_get(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]", DEFAULTS.top_p)),
        temperature=float(temperature if temperature not in (None, 0) else DEFAULTS.temperature),
        repetition_penalty=float(_get(body, "repetition_penalty", lambda v: _is_number(v) and v >= 1,
                                      "a number >= 1", DEFAULTS.repetition_penalty)),
        repetition_window=_get(body, "repetition_window", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        max_new_tokens=max_tokens,
        seed=_get(body, "seed", _is_int, "an integer"),
    )
    try:
        cfg.validate()
    except CpmctlError as e:  # names a flag; the checks above cover every field, so this is a last guard
        raise RequestError(str(e)) from None
    return Decoding(cfg, stop_strings(body.get("stop")), stream,
                    bool(options and options.get("include_usage")),
                    _get(body, "return_token_ids", lambda v: isinstance(v, bool), "true or false", False))


def _check_applies(body: dict, decode: str, temperature) -> None:
    """A knob of another decoding mode would change nothing: refused unless it holds its neutral value."""
    sampling = {"top_p": (1, 1.0), "top_k": (0,), "seed": ()}
    if decode != "sample":
        if temperature not in (None, 0):
            raise RequestError(f"'temperature' applies to sampling only (decode is {decode}; 0 means greedy)",
                               "temperature")
        for name, neutral in sampling.items():
            if body.get(name) is not None and body[name] not in neutral:
                raise RequestError(f"'{name}' applies to sampling only (decode is {decode})", name)
    if decode != "beam" and body.get("beam_size") is not None:
        raise RequestError(f"'beam_size' applies to beam search only (decode is {decode})", "beam_size")


def stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or len(items) > 4 or not all(isinstance(s, str) and s for s in items):
        raise RequestError("'stop' must be a non-empty string or a list of at most 4 of them", "stop")
    return tuple(items)


def prompts(body: dict) -> list[str]:
    """The `prompt` of a completion request: a string or a list of strings, none of them blank."""
    prompt = body.get("prompt")
    items = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(items, list) or not items or not all(isinstance(p, str) for p in items):
        raise RequestError("'prompt' must be a string or a non-empty list of strings (token arrays are not "
                           "supported)", "prompt")
    for i, p in enumerate(items):
        if not p.strip():
            raise RequestError(f"'prompt' {i} is empty" if len(items) > 1 else "'prompt' is empty", "prompt")
    return items


def messages(body: dict) -> list[tuple[str, str]]:
    """The `messages` of a chat request as (role, text): roles system, user, assistant; text content or a list
    of text parts."""
    items = body.get("messages")
    if not isinstance(items, list) or not items:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(items):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"'{where}.role' must be system, user or assistant", "messages")
        unknown = sorted(set(m) - {"role", "content", "name"})
        if unknown:
            raise RequestError(f"'{where}.{unknown[0]}' is not supported", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"'{where}.content' parts must be text parts", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"'{where}.content' must be a string", "messages")
        out.append((m["role"], content))
    if out[-1][0] != "user":
        raise RequestError("the last message must be the user's", "messages")
    return out
