"""Decoding settings, the one type for them: `cpmctl generate` flags, a task's default decoding, the eval and tune
recipes' `decode:` overrides, and the lifecycle's sample generations all build a GenerationConfig.

It sits beside the model config (as generation_config.json does beside an HF checkpoint) so that tasks, which
name their default decoding, need nothing from the decoding code itself (cpmctl/generate/decode.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional, get_args, get_type_hints

from cpmctl import CpmctlError

DecodeMode = Literal["beam", "sample", "greedy"]


@dataclass
class GenerationConfig:
    decode: DecodeMode = "beam"  # greedy | sample | beam
    beam_size: int = 3  # beams kept per prompt (beam)
    top_k: int = 0  # sample only among the k most likely tokens (0: no limit)
    top_p: float = 0.9  # sample from the smallest set of tokens whose probability exceeds top_p
    temperature: float = 0.9  # logits divided by this before sampling
    repetition_penalty: float = 1.0  # CTRL penalty on tokens generated so far (1.0: none)
    max_new_tokens: int = 100  # tokens generated at most per prompt
    seed: int | None = 0  # seed of the sampling generator: the same command gives the same text
    # Ban eos and newline at the first step (the original does it for beam and sampling). None = by decode mode.
    ban_first_step: bool | None = None
    # The repetition penalty looks at the last W generated tokens only (the original's repetition_window).
    repetition_window: int | None = None

    def validate(self) -> None:
        if self.decode not in get_args(DecodeMode):
            raise CpmctlError(f"--decode must be beam, sample or greedy, got '{self.decode}'")
        if self.beam_size < 1:
            raise CpmctlError(f"--beam-size must be >= 1, got {self.beam_size}")
        if self.max_new_tokens < 1:
            raise CpmctlError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.repetition_window is not None and self.repetition_window < 1:
            raise CpmctlError(f"--repetition-window must be >= 1 (or unset for all generated tokens), got {self.repetition_window}")
        if self.repetition_penalty < 1.0:
            raise CpmctlError(f"--repetition-penalty must be >= 1.0, got {self.repetition_penalty}")
        if not 0.0 <= self.top_p <= 1.0:
            raise CpmctlError(f"--top-p must be in [0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise CpmctlError(f"--temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise CpmctlError(f"--top-k must be >= 0, got {self.top_k}")

    @property
    def bans_first_step(self) -> bool:
        return self.decode != "greedy" if self.ban_first_step is None else self.ban_first_step

    def updated(self, overrides: dict) -> "GenerationConfig":
        """A copy with the non-null `overrides` applied, validated."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise CpmctlError(f"unknown decode key '{unknown[0]}' (known: {', '.join(sorted(known))})")
        cfg = dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})
        cfg.validate()
        return cfg


# The recipes' `decode:` section: every GenerationConfig field, optional; null keeps the task's own setting.
DecodeOverrides = dataclasses.make_dataclass(
    "DecodeOverrides",
    [(name, Optional[tp], dataclasses.field(default=None)) for name, tp in get_type_hints(GenerationConfig).items()],
)
DecodeOverrides.__doc__ = "Overrides of a task's decoding (generation tasks); null = the task's default."


def overrides_of(decode) -> dict:
    """The non-null fields of a DecodeOverrides section."""
    return {k: v for k, v in dataclasses.asdict(decode).items() if v is not None}
