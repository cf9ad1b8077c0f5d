"""The two text-matching rules of `data filter` (data/filter_rules.py runs them in order): boilerplate paragraphs
(phrases and patterns, recipe section `boilerplate`) and blocked words (`blocklist`). Phrases and words are merged
into one prefix-trie regex each; a text without cased characters is matched with the case-sensitive twin of each
expression, which finds the same matches several times faster in Python's re."""

from __future__ import annotations

import re
from pathlib import Path

from cpmctl import CpmctlError
from cpmctl.data.recipe import BlocklistRule, BoilerplateRule


def _uncased(text: str) -> bool:
    """No character with a case: a case-insensitive regex matches such a text exactly as the case-sensitive one
    does (and the latter is several times faster in Python's re)."""
    return text.lower() == text and text.upper() == text


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


class Boilerplate:
    def __init__(self, rule: BoilerplateRule):
        self.rule = rule
        phrases = [p.lower() for p in rule.phrases if p]
        self.phrases = trie_regex(phrases) if phrases else None
        self.patterns = [re.compile(p, re.IGNORECASE) for p in rule.patterns]
        # The same expressions without IGNORECASE, for texts without cased characters (see _uncased).
        self.phrases_cs = re.compile(self.phrases.pattern) if phrases else None
        self.patterns_cs = [re.compile(p) for p in rule.patterns]

    def is_boilerplate(self, paragraph: str, uncased: bool = False, phrases: bool = True) -> bool:
        """`phrases=False`: the caller knows no phrase occurs in the paragraph."""
        if len(paragraph) > self.rule.max_line_chars:
            return False
        trie, patterns = (self.phrases_cs, self.patterns_cs) if uncased else (self.phrases, self.patterns)
        if phrases and trie is not None and trie.search(paragraph):
            return True
        for p in patterns:
            if p.search(paragraph):
                return True
        return False

    def apply(self, text: str, uncased: bool | None = None) -> tuple[str, str | None, int]:
        """(text with boilerplate paragraphs removed if configured, reason or None, paragraphs removed).
        `uncased`: _uncased(text), when the caller knows it."""
        paras = text.split("\n")
        uncased = _uncased(text) if uncased is None else uncased
        # The phrases are plain strings: none in the whole text means none in any paragraph.
        trie = self.phrases_cs if uncased else self.phrases
        phrases = trie is not None and trie.search(text) is not None
        if not phrases:  # the usual case: each pattern over the short paragraphs in one C-level loop
            limit = self.rule.max_line_chars
            short = [p for p in paras if len(p) <= limit]
            if not any(any(map(p.search, short)) for p in (self.patterns_cs if uncased else self.patterns)):
                return text, None, 0
        flags = [self.is_boilerplate(p, uncased, phrases) for p in paras]
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
        self.regex_cs = re.compile(self.regex.pattern)

    def check(self, text: str, uncased: bool | None = None) -> str | None:
        hits = (self.regex_cs if (_uncased(text) if uncased is None else uncased) else self.regex).findall(text)
        if len(hits) > self.rule.max_hits:
            return f"{len(hits)} blocked words (first: {hits[0]!r}) > {self.rule.max_hits}"
        return None
