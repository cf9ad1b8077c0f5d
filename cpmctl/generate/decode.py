"""Greedy, beam and sampling decoding with the original's behaviour (shared/reference/cpm-ant.md section 6).

Inputs: 32 prompt slots of task 2, then [<s>] + encode(text); segment 0 / 2; context all True. Rows are
left-padded AFTER the prompt slots; pads get their own span so nothing sees them. Generated tokens are fed through
the KV cache with context False, which is what a cached step computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from cpmctl import CpmctlError
from cpmctl.generate.step import DecodeStep, covers
from cpmctl.model.ant import CPMAnt, KVCache
from cpmctl.model.generation_config import GenerationConfig
from cpmctl.model.inputs import TEXT_SEGMENT, build_inputs
from cpmctl.model.tokenizer import BOS, EOS, NEWLINE, PAD, CPMAntTokenizer


@dataclass
class GenerationResult:
    prompt: str
    text: str
    token_ids: list[int] = field(default_factory=list)


# ----- inputs --------------------------------------------------------------------------------------------------
def encode_prompt(tokenizer: CPMAntTokenizer, text: str) -> list[int]:
    return [BOS] + tokenizer.encode_for_model(text)


# ----- logits processing ---------------------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, generated: torch.Tensor | None, penalty: float,
                             window: int | None = None) -> torch.Tensor:
    """CTRL penalty on tokens generated so far (the last `window` of them when set, as the original's
    repetition_window): logit * p if negative, else logit / p (each token once)."""
    if penalty == 1.0 or generated is None or generated.shape[1] == 0:
        return logits
    if window is not None:
        generated = generated[:, -window:]
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, generated, True)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """The original's filter: keep the top k; keep the smallest prefix whose probability mass exceeds top_p."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p > 0.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def _ban_first(logits: torch.Tensor) -> torch.Tensor:
    logits[:, EOS] = float("-inf")
    logits[:, NEWLINE] = float("-inf")
    return logits


# ----- decoding loops ------------------------------------------------------------------------------------------
@torch.no_grad()
def _prefill(model: CPMAnt, inputs: dict, extra: int) -> tuple[torch.Tensor, KVCache]:
    b, n = inputs["input"].shape
    cache = KVCache.allocate(model, b, n + extra)
    logits = model(inputs["input"], inputs["segment"], inputs["context"], inputs["span"], cache=cache, last_only=True)
    return logits[:, -1].float(), cache


def _step_inputs(rows: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """segment, context, span of one generated token per row: the same every step, so built once per loop."""
    segment = torch.full((rows, 1), TEXT_SEGMENT, dtype=torch.long, device=device)
    return segment, torch.zeros(rows, 1, dtype=torch.bool, device=device), torch.zeros_like(segment)


def _stepper(model: CPMAnt, rows: int, device) -> Callable[[KVCache, torch.Tensor], torch.Tensor]:
    """The step of one decoding loop, (cache, tokens (rows,)) -> fp32 logits (rows, vocab): step.DecodeStep where it
    covers the model (the same logits bit for bit, less per-step work), else the model's forward."""
    segment, context, span = _step_inputs(rows, device)
    fast = DecodeStep(model) if covers(model) else None

    @torch.no_grad()
    def step(cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        if fast is not None:
            return fast(cache, tokens, segment, context, span).float()
        return model(tokens[:, None], segment, context, span, cache=cache)[:, -1].float()

    return step


def _finish(tokens: torch.Tensor, ended_at: torch.Tensor) -> list[list[int]]:
    """Rows of `tokens` cut where each ended (-1 = ran to the limit): one host copy for the whole batch."""
    return [row[:end] if end >= 0 else row for row, end in zip(tokens.tolist(), ended_at.tolist())]


def greedy(model, inputs, cfg: GenerationConfig, on_token: Callable | None = None) -> list[list[int]]:
    b = inputs["input"].shape[0]
    logits, cache = _prefill(model, inputs, cfg.max_new_tokens + 1)
    device = logits.device
    # Preallocated like the KV cache: the tokens so far are the first n columns (no concatenation per step).
    tokens = torch.empty(b, cfg.max_new_tokens, dtype=torch.long, device=device)
    n = 0
    ended_at = torch.full((b,), -1, dtype=torch.long, device=device)
    step = _stepper(model, b, device)
    for i in range(cfg.max_new_tokens):
        if i == 0 and cfg.bans_first_step:
            logits = _ban_first(logits)
        logits = apply_repetition_penalty(logits, tokens[:, :n], cfg.repetition_penalty, cfg.repetition_window)
        token = logits.argmax(-1)
        # A row ends at its first </s>; later tokens of an ended row are computed but not returned.
        ended_at = torch.where((ended_at < 0) & (token == EOS), i, ended_at)
        if bool((ended_at >= 0).all()):  # the one host sync of a step
            break
        tokens[:, n] = token
        n += 1
        if on_token is not None:
            on_token(token.tolist())
        if i + 1 < cfg.max_new_tokens:
            logits = step(cache, token)
    return _finish(tokens[:, :n], ended_at)


def sample(model, inputs, cfg: GenerationConfig, on_token: Callable | None = None) -> list[list[int]]:
    """The original's top-k / top-p sampling: generate_length = max_new_tokens + 1 steps, the last one only
    closes rows that have not produced </s>."""
    b = inputs["input"].shape[0]
    gen = torch.Generator(device=inputs["input"].device)
    gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    steps = cfg.max_new_tokens + 1
    logits, cache = _prefill(model, inputs, steps + 1)
    device = logits.device
    tokens = torch.empty(b, steps, dtype=torch.long, device=device)  # the first n columns are the tokens so far
    n = 0
    ended_at = torch.full((b,), -1, dtype=torch.long, device=device)
    step = _stepper(model, b, device)
    for i in range(steps):
        if i == 0 and cfg.bans_first_step:
            logits = _ban_first(logits)
        logits = apply_repetition_penalty(logits, tokens[:, :n], cfg.repetition_penalty, cfg.repetition_window)
        logits = top_k_top_p_filter(logits / cfg.temperature, cfg.top_k, cfg.top_p)
        token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)[:, 0]
        ends = (token == EOS) | (i == steps - 1)
        ended_at = torch.where((ended_at < 0) & ends, i, ended_at)
        if bool((ended_at >= 0).all()):
            break
        tokens[:, n] = token
        n += 1
        if on_token is not None:
            on_token(token.tolist())
        logits = step(cache, token)
    return _finish(tokens[:, :n], ended_at)


class _Hypotheses:
    """n-best finished hypotheses scored by sum(logprob) / len (length_penalty 1, no early stopping)."""

    def __init__(self, n: int):
        self.n, self.hyps, self.worst = n, [], 1e9

    def add(self, tokens: list[int], sum_logprobs: float) -> None:
        score = sum_logprobs / max(len(tokens), 1)
        if len(self.hyps) < self.n or score > self.worst:
            self.hyps.append((score, tokens))
            if len(self.hyps) > self.n:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.hyps))
                del self.hyps[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum: float, cur_len: int) -> bool:
        return len(self.hyps) >= self.n and self.worst >= best_sum / cur_len


def beam_search(model, inputs, cfg: GenerationConfig) -> list[list[int]]:
    """The original's beam search. As there, a hypothesis cut by the length limit may hold max_new_tokens + 1
    tokens (generate_length = max_new_tokens + 1)."""
    beam = cfg.beam_size
    b = inputs["input"].shape[0]
    limit = cfg.max_new_tokens + 1
    logits, cache = _prefill(model, inputs, limit + 2)
    prompt_length = inputs["input"].shape[1]
    device = logits.device
    expand = torch.arange(b, device=device).repeat_interleave(beam)
    cache.reorder(expand)
    logits = logits.index_select(0, expand)
    vocab = logits.shape[-1]
    beam_scores = torch.zeros(b, beam, device=device)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    hyps = [_Hypotheses(beam) for _ in range(b)]
    done = [False] * b
    # Generated tokens per row: on the device for the penalty, and as lists for the hypotheses (no per-candidate
    # host copies).
    out = torch.empty(b * beam, limit + 1, dtype=torch.long, device=device)  # the first n columns are in use
    n = 0
    generated: list[list[int]] = [[] for _ in range(b * beam)]
    identity = list(range(b * beam))
    step = _stepper(model, b * beam, device)
    for i in range(limit + 1):
        if i == 0 and cfg.bans_first_step:
            logits = _ban_first(logits)
        logits = apply_repetition_penalty(logits, out[:, :n], cfg.repetition_penalty, cfg.repetition_window)
        scores = F.log_softmax(logits, dim=-1) + beam_scores[:, None]
        top_scores, top_ids = torch.topk(scores.view(b, -1), 2 * beam, dim=1, largest=True, sorted=True)
        top_scores_l, top_ids_l = top_scores.tolist(), top_ids.tolist()
        next_beam: list[tuple[float, int, int]] = []
        for s in range(b):
            done[s] = done[s] or hyps[s].is_done(max(top_scores_l[s]), i)
            if done[s]:
                next_beam.extend([(0.0, PAD, 0)] * beam)
                continue
            sent: list[tuple[float, int, int]] = []
            for idx, value in zip(top_ids_l[s], top_scores_l[s]):
                beam_id, word = divmod(idx, vocab)
                row = s * beam + beam_id
                if word == EOS or i == limit:
                    hyps[s].add(generated[row], value)
                else:
                    sent.append((value, word, row))
                if len(sent) == beam:
                    break
            if not sent:
                sent = [(0.0, PAD, 0)] * beam
            next_beam.extend(sent)
        if i == limit or all(done):
            break
        beam_scores = torch.tensor([x[0] for x in next_beam], device=device)
        row_list = [x[2] for x in next_beam]
        words, rows = torch.tensor([[x[1] for x in next_beam], row_list], device=device)
        generated = [generated[row] + [word] for _, word, row in next_beam]
        if row_list != identity:  # every beam extending itself needs no copy of the cache
            out[:, :n] = out[:, :n].index_select(0, rows)
            # Rows only move among the beams of their own prompt (rows of a finished prompt are never read
            # again), and those share the prompt's positions: gather only the generated ones.
            cache.reorder(rows, start=prompt_length)
        out[:, n] = words
        n += 1
        logits = step(cache, words)
    return [max(h.hyps, key=lambda x: x[0])[1] if h.hyps else [] for h in hyps]


def generate(
    model: CPMAnt,
    tokenizer: CPMAntTokenizer,
    prompts: list[str],
    cfg: GenerationConfig,
    on_token: Callable | None = None,
) -> list[GenerationResult]:
    cfg.validate()
    for i, p in enumerate(prompts):
        if not p or not p.strip():
            raise CpmctlError(f"prompt {i + 1} is empty")
    token_lists = [encode_prompt(tokenizer, p) for p in prompts]
    inputs = build_inputs(model, token_lists)
    if cfg.decode == "greedy":
        ids = greedy(model, inputs, cfg, on_token)
    elif cfg.decode == "sample":
        ids = sample(model, inputs, cfg, on_token)
    else:
        ids = beam_search(model, inputs, cfg)
    return [GenerationResult(p, tokenizer.decode(t), t) for p, t in zip(prompts, ids)]
