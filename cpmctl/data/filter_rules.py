"""Quality filters for Chinese web text: one small function per rule of the recipe (recipes/data/filter.yaml,
its sections in data/recipe.py).

Rules run in a fixed order; the first that rejects a document names the reason. Two steps change the text instead
of judging it: `cleanup` (control characters, whitespace, optional traditional->simplified) and the boilerplate
rule's line removal. Lengths count characters that are not whitespace. Repetition follows Gopher (Rae et al.
2021, table A1) with one change for Chinese, which has no spaces: the "words" are units, one CJK character or one
run of ASCII letters/digits (punctuation is not a unit).

Each rule is a `*_reason` function of a document's counts. The `check_*` functions count one text with regular
expressions; `DocumentFilter.batch` counts a whole batch at once (data/textstats.py) and runs the exact n-gram
check only where a bound cannot clear the document, with the same reasons. The boilerplate and blocklist
matchers are in data/filter_text.py.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import numpy as np

from cpmctl.data.recipe import (
    ChineseRatioRule,
    FilterRecipe,
    MinLengthRule,
    ParagraphLengthRule,
    RepetitionRule,
    SymbolRule,
    traditional_converter,
)
from cpmctl.data.filter_text import Blocklist, Boilerplate, _uncased, load_blocklist, trie_regex  # noqa: F401
from cpmctl.data.textstats import (
    CASED,
    CJK,
    CJK_CHARS,
    CLEAN,
    CONTROL_CHARS,
    DIGIT,
    HSPACE_CHARS,
    LINE_BREAK_CHARS,
    SYMBOL,
    SYMBOL_ASCII,
    UNIT_CHAR,
    WORD_STAND_INS,
    WS,
    WS_OTHER,
    COUNTED,
    class_counts,
    repetition_certain,
)

# Rule names in the order they run (the summary table lists them in this order).
RULE_ORDER = ["boilerplate", "min_length", "chinese_ratio", "paragraph_length", "symbols", "repetition",
              "blocklist", "perplexity"]


# ----- text helpers ----------------------------------------------------------------------------------------------
_LINE_BREAKS = re.compile(f"\\r\\n?|[{LINE_BREAK_CHARS}]")
_CONTROL = re.compile(f"[{CONTROL_CHARS}]")
_HSPACE = re.compile(f"[{HSPACE_CHARS}]+")
_CJK = re.compile(f"[{CJK_CHARS}]")
_UNITS = re.compile(f"[A-Za-z0-9]+|{UNIT_CHAR}")
_NOT_UNIT = re.compile(r"(?:[^\w\U000F0000-\U000FFFFF]|_)+")  # keeps letters, digits and the word stand-ins
_STAND_IN = re.compile("[\U000F0000-\U000FFFFF]")
_ASCII_WORD = re.compile(r"[A-Za-z0-9]+")
_DIGIT = re.compile(r"\d")
_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str, converter=None) -> str:
    """Unify line breaks, drop control/zero-width characters, collapse horizontal whitespace, strip paragraphs,
    drop empty ones; optionally convert traditional characters to simplified."""
    text = _CONTROL.sub("", _LINE_BREAKS.sub("\n", text))
    text = _HSPACE.sub(" ", text)
    if converter is not None:
        text = converter.convert(text)
    return strip_paragraphs(text)


def strip_paragraphs(text: str) -> str:
    return "\n".join(p for p in (q.strip() for q in text.split("\n")) if p)


def _already_clean(text: str) -> bool:
    """For a text whose only whitespace is single spaces and newlines (no CLEAN/WS_OTHER character): True when
    clean_text and strip_paragraphs leave it as it is."""
    return not (text[:1] in (" ", "\n") or text[-1:] in (" ", "\n") or "  " in text or " \n" in text
                or "\n " in text or "\n\n" in text)


@lru_cache(maxsize=8)  # several rules ask for the same document's count
def visible_chars(text: str) -> int:
    return len(text) - sum(len(m) for m in _WHITESPACE.findall(text))


def units(text: str) -> list[str]:
    """Gopher's "words" for Chinese: each CJK character, each run of ASCII letters/digits; no punctuation."""
    return _UNITS.findall(text)


# ----- rules: each returns None (pass) or a one-line reason, from the document's counts ----------------------------
def min_length_reason(visible: int, rule: MinLengthRule) -> str | None:
    return f"{visible} characters < {rule.min_chars}" if visible < rule.min_chars else None


def chinese_ratio_reason(cjk: int, visible: int, rule: ChineseRatioRule) -> str | None:
    ratio = cjk / visible if visible else 0.0
    return f"Chinese characters {ratio:.2f} < {rule.min_ratio}" if ratio < rule.min_ratio else None


def paragraph_length_reason(visible: int, paragraphs: int, rule: ParagraphLengthRule) -> str | None:
    avg = visible / paragraphs
    if avg < rule.min_avg_chars:
        return f"average paragraph {avg:.1f} characters < {rule.min_avg_chars}"
    if avg > rule.max_avg_chars:
        return f"average paragraph {avg:.1f} characters > {rule.max_avg_chars}"
    return None


def symbols_reason(symbols: int, digits: int, visible: int, paragraphs: int, ellipsis: int,
                   rule: SymbolRule) -> str | None:
    n = visible or 1
    if symbols / n > rule.max_symbol_ratio:
        return f"symbol ratio {symbols / n:.2f} > {rule.max_symbol_ratio}"
    if digits / n > rule.max_digit_ratio:
        return f"digit ratio {digits / n:.2f} > {rule.max_digit_ratio}"
    share = ellipsis / paragraphs
    if share > rule.max_ellipsis_paragraph_fraction:
        return f"paragraphs ending in an ellipsis {share:.2f} > {rule.max_ellipsis_paragraph_fraction}"
    return None


def paragraph_repetition_reason(paras: list[str], rule: RepetitionRule) -> str | None:
    if len(set(paras)) == len(paras):  # no duplicate: both shares are 0
        if rule.max_duplicate_paragraph_fraction >= 0 and rule.max_duplicate_paragraph_char_fraction >= 0:
            return None
        dup_paras = dup_chars = 0
    else:
        seen: set[str] = set()
        dup_paras = dup_chars = 0
        for p in paras:
            if p in seen:
                dup_paras += 1
                dup_chars += len(p)
            seen.add(p)
    if dup_paras / len(paras) > rule.max_duplicate_paragraph_fraction:
        return f"duplicate paragraphs {dup_paras / len(paras):.2f} > {rule.max_duplicate_paragraph_fraction}"
    total = sum(map(len, paras)) or 1
    if dup_chars / total > rule.max_duplicate_paragraph_char_fraction:
        return f"characters in duplicate paragraphs {dup_chars / total:.2f} > {rule.max_duplicate_paragraph_char_fraction}"
    return None


# ----- the same rules on one text, counted with regular expressions -----------------------------------------------
def check_min_length(text: str, rule: MinLengthRule) -> str | None:
    return min_length_reason(visible_chars(text), rule)


def check_chinese_ratio(text: str, rule: ChineseRatioRule) -> str | None:
    return chinese_ratio_reason(len(_CJK.findall(text)), visible_chars(text), rule)


def check_paragraph_length(text: str, rule: ParagraphLengthRule) -> str | None:
    return paragraph_length_reason(visible_chars(text), len(text.split("\n")), rule)


def check_symbols(text: str, rule: SymbolRule) -> str | None:
    paras = text.split("\n")
    return symbols_reason(len(text) - len(text.translate(_symbol_table())), len(_DIGIT.findall(text)),
                          visible_chars(text), len(paras), sum(p.endswith(("...", "…")) for p in paras), rule)


@lru_cache(maxsize=1)
def _symbol_table() -> dict[int, None]:
    """A str.translate table deleting every Unicode symbol (category S*) of planes 0-1 and some ASCII markup
    characters; built once per process. len(text) - len(text.translate(table)) counts them at C speed."""
    table = {cp: None for cp in range(0x80, 0x20000) if unicodedata.category(chr(cp))[0] == "S"}
    table.update((ord(c), None) for c in SYMBOL_ASCII)
    return table


def _word_base(text: str) -> int:
    """The first code of the ASCII-word stand-ins: private-use plane 15, or past Unicode when the text itself
    holds plane-15 characters (they are units of their own then)."""
    return WORD_STAND_INS[0] if _STAND_IN.search(text) is None else 0x110000


def unit_codes(text: str) -> tuple[np.ndarray, np.ndarray]:
    """The units of `text` as one integer code each, and each unit's length in characters."""
    words: dict[str, str] = {}
    base = _word_base(text)

    def word(m: re.Match) -> str:  # an ASCII word becomes one stand-in character
        return words.setdefault(m.group(), chr(base + len(words)))

    if base < 0x110000:
        s = _NOT_UNIT.sub("", _ASCII_WORD.sub(word, text))
        codes = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    else:  # plane-15 characters of the text's own: number the words past Unicode instead
        codes = np.array([words.setdefault(u, base + len(words)) if _ASCII_WORD.fullmatch(u) else ord(u)
                          for u in re.findall(f"[A-Za-z0-9]+|{UNIT_CHAR}|{_STAND_IN.pattern}", text)], dtype=np.uint64)
    lengths = np.ones(len(codes), dtype=np.int64)
    if words:
        word_lengths = np.array([len(w) for w in words], dtype=np.int64)
        is_word = codes >= base
        lengths[is_word] = word_lengths[(codes[is_word] - base).astype(np.int64)]
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
    return paragraph_repetition_reason(text.split("\n"), rule) or ngram_repetition_reason(text, rule)


def ngram_repetition_reason(text: str, rule: RepetitionRule) -> str | None:
    """The top n-gram and duplicate n-gram rules, counted exactly."""
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
                base = _word_base(text)
                gram = "".join(chr(c) if c < base else "\ufffd" for c in codes[i : i + n].tolist())
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


class DocumentFilter:
    """All text rules of a recipe, compiled once (the perplexity rule runs separately, batched on a model)."""

    def __init__(self, recipe: FilterRecipe, blocklist_words: list[str] | None = None):
        self.recipe = recipe
        self.converter = traditional_converter() if recipe.cleanup.enabled and recipe.cleanup.traditional_to_simplified else None
        self.boilerplate = Boilerplate(recipe.boilerplate) if recipe.boilerplate.enabled else None
        self.blocklist = Blocklist(recipe.blocklist, blocklist_words) if recipe.blocklist.enabled else None
        r = recipe
        self.counted = [name for name, rule in (("min_length", r.min_length), ("chinese_ratio", r.chinese_ratio),
                                                ("paragraph_length", r.paragraph_length), ("symbols", r.symbols))
                        if rule.enabled]
        rep = r.repetition
        self.repetition = rep if rep.enabled else None
        if self.repetition is not None:
            self.top = list(zip(rep.top_ngram_sizes, rep.top_ngram_max_fraction))
            self.duplicate = list(zip(rep.duplicate_ngram_sizes, rep.duplicate_ngram_max_fraction))

    def __call__(self, text: str) -> tuple[str, str | None, str | None, dict]:
        """(text to keep, rejecting rule or None, reason, {"cleaned": bool, "boilerplate_removed": n})."""
        return self.batch([text])[0]

    def batch(self, texts: list[str]) -> list[tuple[str, str | None, str | None, dict]]:
        """__call__ for each of `texts`, with the counting done for all of them at once (a text the cleanup and the
        boilerplate rule leave as it is keeps its counts)."""
        out: list = [None] * len(texts)
        counts = class_counts(texts)
        todo: list[tuple[int, str, dict, bool]] = []
        for i, (text, clean, other, cased) in enumerate(zip(texts, counts[CLEAN], counts[WS_OTHER], counts[CASED])):
            edits = {"cleaned": False, "boilerplate_removed": 0}
            untouched = clean == 0 and other == 0 and _already_clean(text)
            if self.recipe.cleanup.enabled:
                cleaned = text if untouched and self.converter is None else clean_text(text, self.converter)
                edits["cleaned"] = cleaned != text
                text = cleaned
            elif not untouched:
                text = strip_paragraphs(text)
            if not text:
                out[i] = (text, "min_length", "no text", edits)
                continue
            # The cleanup only drops or replaces whitespace and control characters, none of them cased.
            uncased = cased == 0 if self.converter is None else _uncased(text)
            if self.boilerplate is not None:
                text, reason, removed = self.boilerplate.apply(text, uncased)
                edits["boilerplate_removed"] = removed
                if reason:
                    out[i] = (text, "boilerplate", reason, edits)
                    continue
                if not text:
                    out[i] = (text, "min_length", "no text left after boilerplate removal", edits)
                    continue
            todo.append((i, text, edits, uncased))
        changed = [j for j, (i, text, _, _) in enumerate(todo) if text is not texts[i]]
        recount = class_counts([todo[j][1] for j in changed])
        at = dict(zip(changed, range(len(changed))))
        kept = {bit: np.array([recount[bit][at[j]] if j in at else counts[bit][i] for j, (i, *_) in enumerate(todo)],
                              dtype=np.int64) for bit in COUNTED}
        suspect = self._maybe_rejected([t for _, t, _, _ in todo], kept).tolist()
        repeat = []
        for j, (i, text, edits, uncased) in enumerate(todo):
            name = reason = None
            if suspect[j]:
                name, reason = self._counted_rules(text, {bit: int(kept[bit][j]) for bit in COUNTED})
            if reason is None and self.repetition is not None:
                reason = paragraph_repetition_reason(text.split("\n"), self.repetition)
                name = "repetition"
                if reason is None:
                    repeat.append(j)
                    continue
            out[i] = (text, name, reason, edits) if reason else self._blocklist(text, edits, uncased)
        if repeat:
            certain = repetition_certain([todo[j][1] for j in repeat], self.top, self.duplicate)
            for j, sure in zip(repeat, certain):
                i, text, edits, uncased = todo[j]
                reason = None if sure else ngram_repetition_reason(text, self.repetition)
                out[i] = (text, "repetition", reason, edits) if reason else self._blocklist(text, edits, uncased)
        return out

    def _maybe_rejected(self, texts: list[str], c: dict[int, np.ndarray]) -> np.ndarray:
        """Per text: False when none of the counted rules can reject it, from the same float arithmetic vectorised
        (True: _counted_rules decides, and words the reason)."""
        r = self.recipe
        visible = np.array([len(t) for t in texts], dtype=np.int64) - c[WS]
        paragraphs = np.array([t.count("\n") for t in texts], dtype=np.int64) + 1
        out = np.zeros(len(texts), dtype=bool)
        with np.errstate(divide="ignore", invalid="ignore"):
            for name in self.counted:
                if name == "min_length":
                    out |= visible < r.min_length.min_chars
                elif name == "chinese_ratio":
                    out |= np.where(visible != 0, c[CJK] / np.where(visible != 0, visible, 1), 0.0) < r.chinese_ratio.min_ratio
                elif name == "paragraph_length":
                    avg = visible / paragraphs
                    out |= (avg < r.paragraph_length.min_avg_chars) | (avg > r.paragraph_length.max_avg_chars)
                else:
                    n = np.where(visible != 0, visible, 1)
                    out |= (c[SYMBOL] / n > r.symbols.max_symbol_ratio) | (c[DIGIT] / n > r.symbols.max_digit_ratio)
                    if r.symbols.max_ellipsis_paragraph_fraction < 0:  # even no ellipsis is too many
                        out[:] = True
                    out |= np.array([("..." in t) or ("…" in t) for t in texts], dtype=bool)  # ellipses: count exactly
        return out

    def _counted_rules(self, text: str, c: dict[int, int]) -> tuple[str | None, str | None]:
        visible, r = len(text) - c[WS], self.recipe
        paragraphs = text.count("\n") + 1
        for name in self.counted:
            if name == "min_length":
                reason = min_length_reason(visible, r.min_length)
            elif name == "chinese_ratio":
                reason = chinese_ratio_reason(c[CJK], visible, r.chinese_ratio)
            elif name == "paragraph_length":
                reason = paragraph_length_reason(visible, paragraphs, r.paragraph_length)
            else:  # an ellipsis paragraph ends in "..." or "…" before a newline or at the end
                ellipsis = text.count("...\n") + text.count("…\n") + text.endswith(("...", "…"))
                reason = symbols_reason(c[SYMBOL], c[DIGIT], visible, paragraphs, ellipsis, r.symbols)
            if reason:
                return name, reason
        return None, None

    def _blocklist(self, text: str, edits: dict, uncased: bool | None = None) -> tuple:
        reason = self.blocklist.check(text, uncased) if self.blocklist is not None else None
        return (text, "blocklist" if reason else None, reason, edits)
