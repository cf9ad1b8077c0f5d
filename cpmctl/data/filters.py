"""Quality filters for Chinese web text: the recipe (recipes/data/filter.yaml) and one small function per rule.

Rules run in a fixed order; the first that rejects a document names the reason. Two steps change the text instead
of judging it: `cleanup` (control characters, whitespace, optional traditional->simplified) and the boilerplate
rule's line removal. Lengths count characters that are not whitespace. Repetition follows Gopher (Rae et al.
2021, table A1) with one change for Chinese, which has no spaces: the "words" are units, one CJK character or one
run of ASCII letters/digits (punctuation is not a unit).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cpmctl import CpmctlError


# ----- the recipe ----------------------------------------------------------------------------------------------
@dataclass
class CleanupRule:
    enabled: bool = True
    traditional_to_simplified: bool = False  # needs the opencc package


@dataclass
class BoilerplateRule:
    enabled: bool = True
    # A paragraph of at most max_line_chars characters containing a phrase or matching a pattern is boilerplate.
    phrases: list[str] = field(default_factory=lambda: [
        "点击查看更多", "点击查看全文", "点击阅读全文", "阅读全文", "查看更多", "展开全文", "收起全文", "返回首页",
        "返回顶部", "上一篇", "下一篇", "上一页", "下一页", "相关阅读", "相关推荐", "热门推荐", "猜你喜欢",
        "扫一扫", "扫描二维码", "长按识别二维码", "关注我们", "关注公众号", "分享到", "免责声明", "版权所有",
        "版权声明", "本文来源", "转载请注明", "责任编辑", "我们使用cookie", "使用 cookie", "cookie 政策",
        "cookies", "隐私政策", "用户协议", "登录 注册", "立即登录", "立即注册", "网站地图", "联系我们",
        "首页 >", "当前位置", "all rights reserved", "javascript",
    ])
    patterns: list[str] = field(default_factory=lambda: [
        r"^(首页|主页)\s*[>»/|]",  # breadcrumb navigation
        r"^[\s|·•>»/]*((首页|新闻|体育|娱乐|财经|科技|汽车|房产|教育|旅游|健康|军事)[\s|·•/]+){3,}",  # menu rows
        r"(ICP备|ICP证)\s*\d+",
        r"^(Copyright|©|\(c\))",
    ])
    max_line_chars: int = 100
    remove_lines: bool = True  # drop boilerplate paragraphs from kept documents
    max_line_fraction: float = 0.5  # reject a document when this share of its paragraphs is boilerplate


@dataclass
class MinLengthRule:
    enabled: bool = True
    min_chars: int = 100


@dataclass
class ChineseRatioRule:
    enabled: bool = True
    min_ratio: float = 0.4  # CJK characters / all non-whitespace characters


@dataclass
class ParagraphLengthRule:
    enabled: bool = True
    min_avg_chars: float = 10.0  # short paragraphs on average: lists, menus, tables
    max_avg_chars: float = 5000.0  # one endless paragraph: scraped markup or code


@dataclass
class SymbolRule:
    enabled: bool = True
    max_symbol_ratio: float = 0.1  # symbols (Unicode S* and #*|~^_=<>@[]{}\`) / non-whitespace characters
    max_digit_ratio: float = 0.25
    max_ellipsis_paragraph_fraction: float = 0.3  # paragraphs ending in ... or …


@dataclass
class RepetitionRule:
    enabled: bool = True
    max_duplicate_paragraph_fraction: float = 0.3
    max_duplicate_paragraph_char_fraction: float = 0.2
    top_ngram_sizes: list[int] = field(default_factory=lambda: [2, 3, 4])
    top_ngram_max_fraction: list[float] = field(default_factory=lambda: [0.2, 0.18, 0.16])
    duplicate_ngram_sizes: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9, 10])
    duplicate_ngram_max_fraction: list[float] = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])


@dataclass
class BlocklistRule:
    enabled: bool = False
    file: str | None = None  # UTF-8, one word or phrase per line, '#' starts a comment line
    max_hits: int = 0  # reject a document with more hits than this


@dataclass
class PerplexityRule:
    enabled: bool = False
    model: str | None = None  # a cpmctl checkpoint (native dir, original .pt, HF dir)
    vocab: str | None = None  # default: vocab.txt beside the checkpoint
    max_perplexity: float | None = None  # drop documents above this
    percentile_low: float | None = None  # keep the band [low, high] of this run's perplexities (CCNet)
    percentile_high: float | None = None
    batch_size: int = 8
    max_length: int = 1024
    device: str = "auto"
    dtype: str = "fp32"


@dataclass
class FilterRecipe:
    cleanup: CleanupRule = field(default_factory=CleanupRule)
    boilerplate: BoilerplateRule = field(default_factory=BoilerplateRule)
    min_length: MinLengthRule = field(default_factory=MinLengthRule)
    chinese_ratio: ChineseRatioRule = field(default_factory=ChineseRatioRule)
    paragraph_length: ParagraphLengthRule = field(default_factory=ParagraphLengthRule)
    symbols: SymbolRule = field(default_factory=SymbolRule)
    repetition: RepetitionRule = field(default_factory=RepetitionRule)
    blocklist: BlocklistRule = field(default_factory=BlocklistRule)
    perplexity: PerplexityRule = field(default_factory=PerplexityRule)

    def validate(self) -> None:
        r = self.repetition
        if len(r.top_ngram_sizes) != len(r.top_ngram_max_fraction):
            raise CpmctlError("repetition.top_ngram_sizes and top_ngram_max_fraction must have the same length")
        if len(r.duplicate_ngram_sizes) != len(r.duplicate_ngram_max_fraction):
            raise CpmctlError("repetition.duplicate_ngram_sizes and duplicate_ngram_max_fraction must have the same length")
        if any(n < 1 for n in r.top_ngram_sizes + r.duplicate_ngram_sizes):
            raise CpmctlError("repetition: n-gram sizes must be >= 1")
        for i, p in enumerate(self.boilerplate.patterns):
            try:
                re.compile(p)
            except re.error as e:
                raise CpmctlError(f"boilerplate.patterns[{i}]: not a valid regular expression ({e})") from None
        if self.blocklist.enabled and not self.blocklist.file:
            raise CpmctlError("blocklist.enabled needs blocklist.file (one blocked word per line)")
        p = self.perplexity
        if p.enabled:
            if not p.model:
                raise CpmctlError("perplexity.enabled needs perplexity.model (a cpmctl checkpoint)")
            band = (p.percentile_low, p.percentile_high)
            if p.max_perplexity is None and band == (None, None):
                raise CpmctlError("perplexity: set max_perplexity or percentile_low/percentile_high")
            for name, v in (("percentile_low", p.percentile_low), ("percentile_high", p.percentile_high)):
                if v is not None and not 0 <= v <= 100:
                    raise CpmctlError(f"perplexity.{name} must be in [0, 100], got {v}")
            if None not in band and band[0] > band[1]:
                raise CpmctlError("perplexity.percentile_low must not exceed percentile_high")
            if p.batch_size < 1 or p.max_length < 64:
                raise CpmctlError("perplexity: batch_size must be >= 1 and max_length >= 64")
        if self.cleanup.traditional_to_simplified:
            traditional_converter()  # fail now, not in a worker


# Rule names in the order they run (the summary table lists them in this order).
RULE_ORDER = ["boilerplate", "min_length", "chinese_ratio", "paragraph_length", "symbols", "repetition",
              "blocklist", "perplexity"]


# ----- text helpers ----------------------------------------------------------------------------------------------
_LINE_BREAKS = re.compile(r"\r\n?|[\u2028\u2029\x0b\x0c\x85]")
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff\ufffd]")
_HSPACE = re.compile(r"[ \t\xa0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]")
_UNITS = re.compile(r"[A-Za-z0-9]+|[^\W_A-Za-z0-9]")
_WHITESPACE = re.compile(r"\s+")
_SYMBOL_ASCII = set("#*|~^_=<>@[]{}\\`")


def traditional_converter():
    try:
        import opencc
    except ImportError:
        raise CpmctlError("cleanup.traditional_to_simplified needs the opencc package (pip install opencc)") from None
    return opencc.OpenCC("t2s")


def clean_text(text: str, converter=None) -> str:
    """Unify line breaks, drop control/zero-width characters, collapse horizontal whitespace, strip paragraphs,
    drop empty ones; optionally convert traditional characters to simplified."""
    text = _CONTROL.sub("", _LINE_BREAKS.sub("\n", text))
    text = _HSPACE.sub(" ", text)
    if converter is not None:
        text = converter.convert(text)
    return "\n".join(p for p in (q.strip() for q in text.split("\n")) if p)


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
    symbols = digits = 0
    for ch in text:
        if ch.isdigit():
            digits += 1
        elif ch in _SYMBOL_ASCII or (ord(ch) > 127 and unicodedata.category(ch)[0] == "S"):
            symbols += 1
    if symbols / n > rule.max_symbol_ratio:
        return f"symbol ratio {symbols / n:.2f} > {rule.max_symbol_ratio}"
    if digits / n > rule.max_digit_ratio:
        return f"digit ratio {digits / n:.2f} > {rule.max_digit_ratio}"
    paras = text.split("\n")
    ellipsis = sum(p.endswith(("...", "…")) for p in paras) / len(paras)
    if ellipsis > rule.max_ellipsis_paragraph_fraction:
        return f"paragraphs ending in an ellipsis {ellipsis:.2f} > {rule.max_ellipsis_paragraph_fraction}"
    return None


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
    words = units(text)
    lengths = [len(w) for w in words]
    unit_chars = sum(lengths) or 1
    for n, limit in zip(rule.top_ngram_sizes, rule.top_ngram_max_fraction):
        if len(words) < n:
            continue
        counts = Counter(zip(*(words[i:] for i in range(n))))
        gram, count = counts.most_common(1)[0]
        if count > 1:
            share = count * sum(len(w) for w in gram) / unit_chars
            if share > limit:
                return f"top {n}-gram {''.join(gram)!r} covers {share:.2f} > {limit} of the text"
    for n, limit in zip(rule.duplicate_ngram_sizes, rule.duplicate_ngram_max_fraction):
        if len(words) < n:
            continue
        grams = list(zip(*(words[i:] for i in range(n))))
        counts = Counter(grams)
        covered = bytearray(len(words))
        for i, g in enumerate(grams):
            if counts[g] > 1:
                covered[i : i + n] = b"\x01" * n
        share = sum(l for l, c in zip(lengths, covered) if c) / unit_chars
        if share > limit:
            return f"duplicate {n}-grams cover {share:.2f} > {limit} of the text"
    return None


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
