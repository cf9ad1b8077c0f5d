"""Task data: the examples of each task kind and how they are parsed from jsonl objects (read by
cpmctl/data/textio.read_jsonl) (shared/reference/cpm-ant.md
section 10). Generation `{"input", "target"}` (optional `"answer"`), choice `{"input", "options", "label"}`,
ranking `{"query", "document", "relevance"}` (optional `"qid"` to group pairs); optional `"id"` on every kind.
A bad line is a one-line error naming file:line and the field."""

from __future__ import annotations

from dataclasses import dataclass

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


# ----- fields ------------------------------------------------------------------------------------------------
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
