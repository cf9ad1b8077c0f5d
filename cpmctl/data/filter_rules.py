"""Quality filters for Chinese web text: one small function per rule of the recipe (recipes/data/filter.yaml,
its sections in data/recipe.py).

Rules run in a fixed order; the first that rejects a document names the reason. Two steps change the text instead
of judging it: `cleanup` (control characters, whitespace, optional traditional->simplified) and the boilerplate
rule's line removal. Lengths count characters that are not whitespace. Repetition follows Gopher (Rae et al.
2021, table A1) with one change for Chinese, which has no spaces: the "words" are units, one CJK character or one
run of ASCII letters/digits (punctuation is not a unit).
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np

from cpmctl import CpmctlError
from cpmctl.data.recipe import (
    BlocklistRule,
    BoilerplateRule,
    ChineseRatioRule,
    FilterRecipe,
    MinLengthRule,
    ParagraphLengthRule,
    RepetitionRule,
    SymbolRule,
    traditional_converter,
)

# Rule names in the order they run (the summary table lists them in this order).
RULE_ORDER = ["boilerplate", "min_length", "chinese_ratio", "paragraph_length", "symbols", "repetition",
              "blocklist", "perplexity"]


# ----- text helpers ----------------------------------------------------------------------------------------------
_LINE_BREAKS = re.compile(r"\r\n?|[\u2028\u2029\x0b\x0c\x85]")
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff\ufffd]")
_HSPACE = re.compile(r"[ \t\xa0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]")
_UNITS = re.compile(r"[A-Za-z0-9]+|[^\W_A-Za-z0-9]")
_NOT_UNIT = re.compile(r"(?:[^\w\U000F0000-\U000FFFFF]|_)+")  # keeps letters, digits and the word stand-ins
_ASCII_WORD = re.compile(r"[A-Za-z0-9]+")
_DIGIT = re.compile(r"\d")
_WHITESPACE = re.compile(r"\s+")
_SYMBOL_ASCII = set("#*|~^_=<>@[]{}\\`")


def clean_text(text: str, converter=None) -> str:
    """Unify line breaks, drop control/zero-width characters, collapse horizontal whitespace, strip paragraphs,
    drop empty ones; optionally convert traditional characters to simplified."""
    text = _CONTROL.sub("", _LINE_BREAKS.sub("\n", text))
    text = _HSPACE.sub(" ", text)
    if converter is not None:
        text = converter.convert(text)
    return "\n".join(p for p in (q.strip() for q in text.split("\n")) if p)


@lru_cache(maxsize=8)  # several rules ask for the same document's count
def visible_chars(text: str) -> int:
    return len(text) - sum(len(m) for m in _WHITESPACE.findall(text))


def units(text: str) -> list[str]:
    """Gopher's "words" for Chinese: each CJK character, each run of ASCII letters/digits; no punctuation."""
    return _UNITS.findall(text)


def trie_regex(words: list[str]) -> re.Pattern:
    """One regex matching any of `words`, built as a prefix trie so matching costs O(text) rather than
    O(text x words) (Python's re does not merge a plain alternation)."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = True

    def build(node: dict) -> str:
        end = "" in node
        branches = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch != ""]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if end else body

    return re.compile(build(trie), re.IGNORECASE)


def load_blocklist(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CpmctlError(f"blocklist.file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise CpmctlError(f"{path}: blocklist is not UTF-8 (byte {e.start})") from None
    words = [w.strip() for w in lines if w.strip() and not w.lstrip().startswith("#")]
    if not words:
        raise CpmctlError(f"{path}: blocklist has no words")
    return words


# ----- rules: each returns None (pass) or a one-line reason ------------------------------------------------------
def check_min_length(text: str, rule: MinLengthRule) -> str | None:
    n = visible_chars(text)
    return f"{n} characters < {rule.min_chars}" if n < rule.min_chars else None


def check_chinese_ratio(text: str, rule: ChineseRatioRule) -> str | None:
    n = visible_chars(text)
    ratio = len(_CJK.findall(text)) / n if n else 0.0
    return f"Chinese characters {ratio:.2f} < {rule.min_ratio}" if ratio < rule.min_ratio else None


def check_paragraph_length(text: str, rule: ParagraphLengthRule) -> str | None:
    paras = text.split("\n")
    avg = visible_chars(text) / len(paras)
    if avg < rule.min_avg_chars:
        return f"average paragraph {avg:.1f} characters < {rule.min_avg_chars}"
    if avg > rule.max_avg_chars:
        return f"average paragraph {avg:.1f} characters > {rule.max_avg_chars}"
    return None


def check_symbols(text: str, rule: SymbolRule) -> str | None:
    n = visible_chars(text) or 1
    symbols = len(text) - len(text.translate(_symbol_table()))
    if symbols / n > rule.max_symbol_ratio:
        return f"symbol ratio {symbols / n:.2f} > {rule.max_symbol_ratio}"
    digits = len(_DIGIT.findall(text))
    if digits / n > rule.max_digit_ratio:
        return f"digit ratio {digits / n:.2f} > {rule.max_digit_ratio}"
    paras = text.split("\n")
    ellipsis = sum(p.endswith(("...", "…")) for p in paras) / len(paras)
    if ellipsis > rule.max_ellipsis_paragraph_fraction:
        return f"paragraphs ending in an ellipsis {ellipsis:.2f} > {rule.max_ellipsis_paragraph_fraction}"
    return None


@lru_cache(maxsize=1)
def _symbol_table() -> dict[int, None]:
    """A str.translate table deleting every Unicode symbol (category S*) of planes 0-1 and some ASCII markup
    characters; built once per process. len(text) - len(text.translate(table)) counts them at C speed."""
    table = {cp: None for cp in range(0x80, 0x20000) if unicodedata.category(chr(cp))[0] == "S"}
    table.update((ord(c), None) for c in _SYMBOL_ASCII)
    return table


def unit_codes(text: str) -> tuple[np.ndarray, np.ndarray]:
    """The units of `text` as one integer code each, and each unit's length in characters."""
    words: dict[str, str] = {}

    def word(m: re.Match) -> str:  # an ASCII word becomes one private-use character
        return words.setdefault(m.group(), chr(0xF0000 + len(words)))

    s = _NOT_UNIT.sub("", _ASCII_WORD.sub(word, text))
    codes = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    lengths = np.ones(len(codes), dtype=np.int64)
    if words:
        word_lengths = np.array([len(w) for w in words], dtype=np.int64)
        is_word = codes >= 0xF0000
        lengths[is_word] = word_lengths[(codes[is_word] - 0xF0000).astype(np.int64)]
    return codes, lengths


def _ngram_ids(codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(id of each n-gram start, count of each id): n-grams compared by a 64-bit polynomial hash."""
    m = len(codes) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    for k in range(n):
        h = h * np.uint64(0x100000001B3) + codes[k : k + m]
    _, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
    return inverse, counts


def check_repetition(text: str, rule: RepetitionRule) -> str | None:
    paras = text.split("\n")
    seen: set[str] = set()
    dup_paras = dup_chars = 0
    for p in paras:
        if p in seen:
            dup_paras += 1
            dup_chars += len(p)
        seen.add(p)
    if dup_paras / len(paras) > rule.max_duplicate_paragraph_fraction:
        return f"duplicate paragraphs {dup_paras / len(paras):.2f} > {rule.max_duplicate_paragraph_fraction}"
    total = sum(len(p) for p in paras) or 1
    if dup_chars / total > rule.max_duplicate_paragraph_char_fraction:
        return f"characters in duplicate paragraphs {dup_chars / total:.2f} > {rule.max_duplicate_paragraph_char_fraction}"
    codes, lengths = unit_codes(text)
    unit_chars = int(lengths.sum()) or 1
    window = np.concatenate([[0], np.cumsum(lengths)])  # chars of units [i, i+n) = window[i+n] - window[i]
    # Top n-gram: the most frequent n-gram's occurrences x its characters, over all unit characters.
    best_small = None  # (n, top count) of the smallest size: bounds the larger ones
    longest = int(lengths.max()) if len(lengths) else 0
    for n, limit in sorted(zip(rule.top_ngram_sizes, rule.top_ngram_max_fraction)):
        if len(codes) < n:
            continue
        if best_small is not None and best_small * n * longest / unit_chars <= limit:
            continue  # an n-gram occurs at most as often as the top smaller n-gram: cannot exceed the limit
        inverse, counts = _ngram_ids(codes, n)
        top = int(counts.argmax())
        count = int(counts[top])
        best_small = count if best_small is None else best_small
        if count > 1:
            i = int(np.argmax(inverse == top))
            share = count * int(window[i + n] - window[i]) / unit_chars
            if share > limit:
                gram = "".join(_decode_units(codes[i : i + n]))
                return f"top {n}-gram {gram!r} covers {share:.2f} > {limit} of the text"
    # Duplicate n-grams: characters covered by any n-gram occurring more than once. Coverage only shrinks as n
    # grows, so when the smallest size is under every limit, the larger sizes are too.
    sizes = sorted(zip(rule.duplicate_ngram_sizes, rule.duplicate_ngram_max_fraction))
    for k, (n, limit) in enumerate(sizes):
        if len(codes) < n:
            continue
        inverse, counts = _ngram_ids(codes, n)
        starts = np.flatnonzero(counts[inverse] > 1)
        m = len(codes) + 1
        covered = np.cumsum(np.bincount(starts, minlength=m) - np.bincount(starts + n, minlength=m))[:-1] > 0
        share = int(lengths[covered].sum()) / unit_chars
        if share > limit:
            return f"duplicate {n}-grams cover {share:.2f} > {limit} of the text"
        if k == 0 and share <= min(lim for _, lim in sizes):
            break
    return None


def _decode_units(codes: np.ndarray):
    for c in codes.tolist():
        yield chr(c) if c < 0xF0000 else "\ufffd"


class Boilerplate:
    def __init__(self, rule: BoilerplateRule):
        self.rule = rule
        phrases = [p.lower() for p in rule.phrases if p]
        self.phrases = trie_regex(phrases) if phrases else None
        self.patterns = [re.compile(p, re.IGNORECASE) for p in rule.patterns]

    def is_boilerplate(self, paragraph: str) -> bool:
        if len(paragraph) > self.rule.max_line_chars:
            return False
        if self.phrases is not None and self.phrases.search(paragraph):
            return True
        return any(p.search(paragraph) for p in self.patterns)

    def apply(self, text: str) -> tuple[str, str | None, int]:
        """(text with boilerplate paragraphs removed if configured, reason or None, paragraphs removed)."""
        paras = text.split("\n")
        flags = [self.is_boilerplate(p) for p in paras]
        hits = sum(flags)
        if hits and hits / len(paras) >= self.rule.max_line_fraction:
            return text, f"{hits} of {len(paras)} paragraphs are boilerplate", 0
        if hits and self.rule.remove_lines:
            return "\n".join(p for p, f in zip(paras, flags) if not f), None, hits
        return text, None, 0


class Blocklist:
    def __init__(self, rule: BlocklistRule, words: list[str]):
        self.rule = rule
        self.regex = trie_regex([w.lower() for w in words])

    def check(self, text: str) -> str | None:
        hits = self.regex.findall(text)
        if len(hits) > self.rule.max_hits:
            return f"{len(hits)} blocked words (first: {hits[0]!r}) > {self.rule.max_hits}"
        return None


class DocumentFilter:
    """All text rules of a recipe, compiled once (the perplexity rule runs separately, batched on a model)."""

    def __init__(self, recipe: FilterRecipe, blocklist_words: list[str] | None = None):
        self.recipe = recipe
        self.converter = traditional_converter() if recipe.cleanup.enabled and recipe.cleanup.traditional_to_simplified else None
        self.boilerplate = Boilerplate(recipe.boilerplate) if recipe.boilerplate.enabled else None
        self.blocklist = Blocklist(recipe.blocklist, blocklist_words) if recipe.blocklist.enabled else None
        r = recipe
        self.checks = [
            (name, fn, rule)
            for name, fn, rule in (
                ("min_length", check_min_length, r.min_length),
                ("chinese_ratio", check_chinese_ratio, r.chinese_ratio),
                ("paragraph_length", check_paragraph_length, r.paragraph_length),
                ("symbols", check_symbols, r.symbols),
                ("repetition", check_repetition, r.repetition),
            )
            if rule.enabled
        ]

    def __call__(self, text: str) -> tuple[str, str | None, str | None, dict]:
        """(text to keep, rejecting rule or None, reason, {"cleaned": bool, "boilerplate_removed": n})."""
        edits = {"cleaned": False, "boilerplate_removed": 0}
        if self.recipe.cleanup.enabled:
            cleaned = clean_text(text, self.converter)
            edits["cleaned"] = cleaned != text
            text = cleaned
        else:
            text = "\n".join(p for p in (q.strip() for q in text.split("\n")) if p)
        if not text:
            return text, "min_length", "no text", edits
        if self.boilerplate is not None:
            text, reason, removed = self.boilerplate.apply(text)
            edits["boilerplate_removed"] = removed
            if reason:
                return text, "boilerplate", reason, edits
            if not text:
                return text, "min_length", "no text left after boilerplate removal", edits
        for name, check, rule in self.checks:
            reason = check(text, rule)
            if reason:
                return text, name, reason, edits
        if self.blocklist is not None:
            reason = self.blocklist.check(text)
            if reason:
                return text, "blocklist", reason, edits
        return text, None, None, edits
