"""Task data: the examples of each task kind and how they are read from jsonl (shared/reference/cpm-ant.md
section 10). Generation `{"input", "target"}` (optional `"answer"`), choice `{"input", "options", "label"}`,
ranking `{"query", "document", "relevance"}` (optional `"qid"` to group pairs); optional `"id"` on every kind.
A bad line is a one-line error naming file:line and the field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cpmctl import CpmctlError

SPLITS = ("train", "dev", "test")
KINDS = ("generation", "choice", "ranking")


# ----- examples ------------------------------------------------------------------------------------------------
@dataclass
class GenerationExample:
    input: str
    target: str
    answer: str | None = None  # Math23K: the numeric answer when the target is an equation
    id: str | None = None
    line: int = 0


@dataclass
class ChoiceExample:
    input: str
    options: list[str]
    label: int
    id: str | None = None
    line: int = 0


@dataclass
class RankingExample:
    query: str
    document: str
    relevance: float
    qid: str | None = None
    id: str | None = None
    line: int = 0

    @property
    def group(self) -> str:
        return self.qid if self.qid is not None else self.query


Example = GenerationExample | ChoiceExample | RankingExample


# ----- jsonl reading -------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line is a CpmctlError naming file:line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CpmctlError(f"data file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise CpmctlError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except IsADirectoryError:
        raise CpmctlError(f"{path}: is a directory, expected a .jsonl file") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CpmctlError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise CpmctlError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append((n, obj))
    return rows


def text_field(obj: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in obj:
        raise CpmctlError(f"{where}: missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise CpmctlError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise CpmctlError(f"{where}: field '{key}' is empty")
    return value


def optional_id(obj: dict, key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise CpmctlError(f"{where}: field '{key}' must be a string or an integer")
    return str(value)
