"""Prompt templates: `str.format` fields filled with an example's values, encoded piece by piece so that only the
field chosen for truncation is ever cut and the template's own words always survive."""

from __future__ import annotations

import string

from cpmctl import CpmctlError
from cpmctl.model.tokenizer import CPMAntTokenizer


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def check_template(template: str, allowed: set[str], required: set[str], where: str) -> None:
    try:
        fields = template_fields(template)
    except ValueError as e:
        raise CpmctlError(f"{where}: bad template {template!r} ({e})") from None
    unknown = [f for f in fields if f not in allowed]
    if unknown:
        raise CpmctlError(f"{where}: template field '{{{unknown[0]}}}' is not one of {sorted(allowed)}")
    missing = sorted(required - set(fields))
    if missing:
        raise CpmctlError(f"{where}: template must contain '{{{missing[0]}}}'")


def fill_template(tokenizer: CPMAntTokenizer, template: str, values: dict[str, str], budget: int,
                  truncate: str, keep: str) -> list[int]:
    """Token ids of the filled template within `budget` tokens. Each literal and value is encoded on its own, so
    only the `truncate` value is cut (keep 'head' or 'tail') and the template's own words always survive."""
    parts: list[tuple[str | None, list[int]]] = []
    for literal, name, _, _ in string.Formatter().parse(template):
        if literal:
            parts.append((None, tokenizer.encode_for_model(literal)))
        if name is not None:
            parts.append((name, tokenizer.encode_for_model(values[name])))
    total = sum(len(ids) for _, ids in parts)
    if total > budget:
        excess = total - budget
        for i, (name, ids) in enumerate(parts):
            if name == truncate:
                keep_n = max(len(ids) - excess, 0)
                parts[i] = (name, ids[:keep_n] if keep == "head" else ids[len(ids) - keep_n :])
                excess -= len(ids) - keep_n
                break
        if excess > 0:  # the template alone is longer than the budget: cut from the end
            flat = [t for _, ids in parts for t in ids]
            return flat[:budget]
    return [t for _, ids in parts for t in ids]
