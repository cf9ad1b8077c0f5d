"""Character statistics of a whole batch of documents in a few numpy passes, for the filter rules
(data/filter_rules.py).

Every character is classified once through one 2.2 MB lookup table (whitespace, CJK, symbol, digit, characters the
cleanup would touch, unit characters, ASCII letters/digits); per-document counts come from one histogram of
(document, class) pairs. The table is built from the very regular expressions and Unicode categories the rules are
defined by, so a count here equals the rule's own count (tests/test_data_filters.py checks both on every kind of
character).

The repetition rules need exact n-gram counts only for documents near a limit. `repetition_certain` bounds, for
all documents at once, the share of the most frequent n-gram and of the duplicated n-grams from above (n-gram keys
sorted per batch; a hash collision can only raise a count, never lower it); a document whose bounds are all within
the limits cannot be rejected by those rules, and only the others go through the exact per-document check.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import numpy as np

# The character classes of the rules, one source for the regexes (filter_rules.py) and the table below.
LINE_BREAK_CHARS = "\u2028\u2029\x0b\x0c\x85"  # and \r, \r\n
CONTROL_CHARS = "\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff\ufffd"
HSPACE_CHARS = " \t\xa0\u1680\u2000-\u200a\u202f\u205f\u3000"
CJK_CHARS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
SYMBOL_ASCII = "#*|~^_=<>@[]{}\\`"
UNIT_CHAR = r"[^\W_A-Za-z0-9]"  # a unit of its own; a run of ASCII letters/digits is one unit too
WORD_STAND_INS = (0xF0000, 0x100000)  # private-use plane 15: unit_codes' stand-ins for ASCII words

# Bits of the table. The first six are counted per document, CASED (a character lower() or upper() changes) too.
WS, CJK, SYMBOL, DIGIT, CLEAN, WS_OTHER, UNIT, ALNUM, CASED = 1, 2, 4, 8, 16, 32, 64, 128, 256
COUNTED = (WS, CJK, SYMBOL, DIGIT, CLEAN, WS_OTHER)
_VALUES_WITH = {bit: np.array([v for v in range(64) if v & bit]) for bit in COUNTED}


@lru_cache(maxsize=1)
def char_classes() -> np.ndarray:
    """Class bits of every code point (built once per process, ~0.1 s; forked workers inherit it)."""
    table = np.zeros(0x110000, dtype=np.uint16)
    every = np.arange(0x110000, dtype=np.uint32).tobytes().decode("utf-32-le", "surrogatepass")  # every character

    patterns = {WS: r"\s", CJK: f"[{CJK_CHARS}]", DIGIT: r"\d", CLEAN: f"[\r{LINE_BREAK_CHARS}{CONTROL_CHARS}{HSPACE_CHARS}]",
                UNIT: UNIT_CHAR}
    # Above plane 3 (unassigned, tags and private use) none of them matches today: one scan checks that, so the
    # five scans cover the first 0x40000 code points only (and all of them if that check ever fails).
    high = 0x40000
    if re.search(f"[\\s\\w\r{LINE_BREAK_CHARS}{CONTROL_CHARS}{HSPACE_CHARS}{CJK_CHARS}]", every[high:]):  # \w: \d, units
        high = 0x110000
    for bit, pattern in patterns.items():  # what `\s` (visible_chars) skips, CJK, digits, what the cleanup edits, units
        for m in re.finditer(f"(?:{pattern})+", every[:high]):
            table[m.start() : m.end()] |= bit
    table[ord(" ")] &= 0xFFFF ^ CLEAN  # one space is left as it is; two in a row are caught by a substring test
    table[WORD_STAND_INS[0] : WORD_STAND_INS[1]] |= UNIT
    for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789":
        table[ord(c)] |= ALNUM
    # The symbol rule's set: Unicode S* of planes 0-1 and some ASCII markup characters.
    category = unicodedata.category
    table[0x80:0x20000][[category(c)[0] == "S" for c in every[0x80:0x20000]]] |= SYMBOL
    for c in SYMBOL_ASCII:
        table[ord(c)] |= SYMBOL
    other = ((table & WS) != 0) & ((table & CLEAN) == 0)
    other[[ord(" "), ord("\n")]] = False
    table[other] |= WS_OTHER  # whitespace the cleanup keeps but a paragraph strip removes
    for at in range(0, 0x110000, 256):  # blocks with no cased character are cleared by two whole-string calls
        block = every[at : at + 256]
        if block.lower() != block or block.upper() != block:
            table[at : at + 256][np.array([c.lower() != c or c.upper() != c for c in block])] |= CASED
    return table


def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(code points of all texts end to end, start offset of each text plus the total at the end)."""
    codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    starts = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)), out=starts[1:])
    return codes, starts


def _doc_of(starts: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(starts) - 1, dtype=np.int64), np.diff(starts))


def class_counts(texts: list[str]) -> dict[int, list[int]]:
    """Per text, how many of its characters carry each bit of COUNTED and CASED: {bit: [count per text]}."""
    if not texts:
        return {bit: [] for bit in (*COUNTED, CASED)}
    codes, starts = encode(texts)
    cls = char_classes()[codes]
    doc = _doc_of(starts)
    hist = np.bincount(doc * 64 + (cls & 63), minlength=len(texts) * 64).reshape(len(texts), 64)
    counts = {bit: hist[:, _VALUES_WITH[bit]].sum(axis=1).tolist() for bit in COUNTED}
    counts[CASED] = np.bincount(doc[(cls & CASED) != 0], minlength=len(texts)).tolist()
    return counts


# ----- repetition bounds -----------------------------------------------------------------------------------------
_P = np.uint64(0x100000001B3)
_P_INV = np.uint64(pow(0x100000001B3, -1, 1 << 64))
_MIX = np.uint64(0x9E3779B97F4A7C15)


def _powers(base: np.uint64, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.uint64)
    if n:
        out[0] = 1
        out[1:] = base
        np.multiply.accumulate(out, out=out)  # wraps modulo 2**64, as the hashes do
    return out


class Units:
    """The units of a batch (rule text: one CJK/word character, or one run of ASCII letters/digits) as one integer
    code each: `code`, `length` (characters), `doc` (which text), in order."""

    def __init__(self, texts: list[str]):
        codes, starts = encode(texts)
        self.docs = len(texts)
        cls = char_classes()[codes]
        is_al = (cls & ALNUM) != 0
        if not is_al.any():  # no ASCII letters or digits (much Chinese text): every unit is one character
            pos = np.flatnonzero(cls & UNIT)
            is_unit = np.append((cls & UNIT) != 0, False)  # one past the end: an index for empty last texts
            self.count = np.add.reduceat(is_unit, starts[:-1], dtype=np.int64) if self.docs else starts[:0]
            self.count[starts[:-1] == starts[1:]] = 0  # reduceat reads one element for an empty text
            self.doc = np.repeat(np.arange(self.docs), self.count)
            self.code = codes[pos].astype(np.uint64)
            self.length = np.ones(len(pos), dtype=np.int64)
            self.chars = np.maximum(self.count, 1)
            self.longest = (self.count > 0).astype(np.int64)
            return
        firsts, lasts = starts[:-1][np.diff(starts) > 0], starts[1:][np.diff(starts) > 0] - 1
        prev_al = np.concatenate(([False], is_al[:-1]))
        prev_al[firsts] = False  # a run of ASCII never continues into the next text
        next_al = np.concatenate((is_al[1:], [False]))
        next_al[lasts] = False
        run_start, run_end = is_al & ~prev_al, is_al & ~next_al
        is_start = ((cls & UNIT) != 0) | run_start
        pos = np.flatnonzero(is_start)
        self.doc = _doc_of(starts)[pos]
        self.code = codes[pos].astype(np.uint64)
        self.length = np.ones(len(pos), dtype=np.int64)
        is_run = run_start[pos]
        if is_run.any():
            rs, re_ = np.flatnonzero(run_start), np.flatnonzero(run_end)
            self.length[is_run] = re_ - rs + 1
            # A run's code: its characters as a polynomial, from prefix sums over the ASCII characters only.
            ascii_at = np.flatnonzero(is_al)
            a, b = np.searchsorted(ascii_at, rs), np.searchsorted(ascii_at, re_) + 1
            prefix = np.zeros(len(ascii_at) + 1, dtype=np.uint64)
            np.cumsum(codes[ascii_at].astype(np.uint64) * _powers(_P, len(ascii_at)), out=prefix[1:])
            word = (prefix[b] - prefix[a]) * _powers(_P_INV, len(ascii_at))[a]
            self.code[is_run] = word | np.uint64(1 << 63)  # apart from code points
        self.count = np.bincount(self.doc, minlength=self.docs)
        self.chars = np.maximum(np.bincount(self.doc, weights=self.length, minlength=self.docs).astype(np.int64), 1)
        self.longest = (self.count > 0).astype(np.int64)
        if is_run.any():
            np.maximum.at(self.longest, self.doc[is_run], self.length[is_run])

    @property
    def doc_bits(self) -> np.ndarray:
        """12 low bits of each unit's document, in the top bits of a uint32 key."""
        if getattr(self, "_doc_bits", None) is None:
            self._doc_bits = (self.doc & 0xFFF).astype(np.uint32) << np.uint32(20)
        return self._doc_bits

    def gram_runs(self, hashes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(document, occurrences) of each distinct n-gram of each text, from `hashes` (the n-gram hash at each
        start). Keys keep 12 bits of the document and 20 of the hash: two n-grams sharing a key are counted
        together, which can only raise a count."""
        m = len(hashes)
        doc = self.doc[:m]
        valid = doc == self.doc[n - 1 : n - 1 + m]
        mixed = ((hashes[valid] * _MIX) >> np.uint64(44)).astype(np.uint32)
        keys = np.sort(self.doc_bits[:m][valid] | mixed)
        first = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        occurrences = np.diff(first, append=len(keys))
        # The 12 document bits name the text only up to multiples of 4096: map each run to the texts it can be.
        run_doc_low = (keys[first] >> np.uint32(20)).astype(np.int64)
        return run_doc_low, occurrences

    def per_doc(self, run_doc_low: np.ndarray, values: np.ndarray, reduce) -> np.ndarray:
        """`reduce` (np.maximum or np.add) of run values per text; texts sharing 12 low bits share the result."""
        low = np.zeros(4096, dtype=np.int64)
        if len(values):  # runs come sorted by their document bits: reduce each stretch of equal bits
            first = np.flatnonzero(np.concatenate(([True], run_doc_low[1:] != run_doc_low[:-1])))
            low[run_doc_low[first]] = reduce.reduceat(values, first)
        return low[np.arange(self.docs) & 0xFFF]


def repetition_certain(texts: list[str], top: list[tuple[int, float]], duplicate: list[tuple[int, float]]) -> list[bool]:
    """Per text: True when neither the top n-gram rule (`top`: (n, limit) pairs) nor the duplicate n-gram rule
    (`duplicate`) can reject it, as check_repetition decides them; False means "check exactly"."""
    units = Units(texts)
    certain = np.ones(units.docs, dtype=bool)
    top, duplicate = sorted(top), sorted(duplicate)
    sizes = [n for n, _ in top[:1] + duplicate[:1]]
    if not sizes or not len(units.code):
        return certain.tolist()
    grams = {}
    h = units.code.copy()
    for n in range(2, max(sizes) + 1):
        h = h[:-1] * _P + units.code[n - 1 :]
        if n in sizes:
            grams[n] = h
    if 1 in sizes:
        grams[1] = units.code
    chars = units.chars
    if top:
        n0 = top[0][0]
        if len(grams[n0]):
            docs, occurrences = units.gram_runs(grams[n0], n0)
            # No n-gram (n >= n0) occurs more often than the most frequent n0-gram, nor spans more than n units.
            most = units.per_doc(docs, occurrences, np.maximum)
            for n, limit in top:
                share = most * n * units.longest / chars
                certain &= (units.count < n) | (most <= 1) | (share <= limit)
    if duplicate:
        n1, low = duplicate[0][0], min(limit for _, limit in duplicate)
        if len(grams[n1]):
            docs, occurrences = units.gram_runs(grams[n1], n1)
            repeated = occurrences > 1
            starts = units.per_doc(docs[repeated], occurrences[repeated], np.add)
            # Each repeated n-gram start covers at most n units of at most `longest` characters.
            share = np.minimum(starts * n1 * units.longest, chars) / chars
            certain &= (units.count < n1) | (share <= low)
    return certain.tolist()
