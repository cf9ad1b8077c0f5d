"""The `data filter` recipe (recipes/data/filter.yaml): one section per rule, each rule's thresholds with the
defaults a run starts from. The rules that read them are in data/filter_rules.py, in the order they run."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from cpmctl import CpmctlError
from cpmctl.device import DTYPE_NAMES
from cpmctl.recipe import at_least, check_recipe, fail, join, within

Dtype = Literal[DTYPE_NAMES]  # fp32 | bf16 | fp16 (GPU)


@dataclass
class CleanupRule:
    enabled: bool = True  # clean kept documents: line breaks unified, control characters dropped, spaces collapsed
    traditional_to_simplified: bool = False  # needs the opencc package

    def check(self, at: str) -> None:
        if self.traditional_to_simplified:
            traditional_converter()  # fail now, not in a worker


@dataclass
class BoilerplateRule:
    enabled: bool = True  # find navigation, share and copyright lines
    # A paragraph of at most max_line_chars characters containing a phrase or matching a pattern is boilerplate.
    phrases: list[str] = field(default_factory=lambda: [
        "点击查看更多", "点击查看全文", "点击阅读全文", "阅读全文", "查看更多", "展开全文", "收起全文", "返回首页",
        "返回顶部", "上一篇", "下一篇", "上一页", "下一页", "相关阅读", "相关推荐", "热门推荐", "猜你喜欢",
        "扫一扫", "扫描二维码", "长按识别二维码", "关注我们", "关注公众号", "分享到", "免责声明", "版权所有",
        "版权声明", "本文来源", "转载请注明", "责任编辑", "我们使用cookie", "使用 cookie", "cookie 政策",
        "cookies", "隐私政策", "用户协议", "登录 注册", "立即登录", "立即注册", "网站地图", "联系我们",
        "首页 >", "当前位置", "all rights reserved", "javascript",
    ])
    patterns: list[str] = field(default_factory=lambda: [  # regular expressions (Python re) for boilerplate lines
        r"^(首页|主页)\s*[>»/|]",  # breadcrumb navigation
        r"^[\s|·•>»/]*((首页|新闻|体育|娱乐|财经|科技|汽车|房产|教育|旅游|健康|军事)[\s|·•/]+){3,}",  # menu rows
        r"(ICP备|ICP证)\s*\d+",
        r"^(Copyright|©|\(c\))",
    ])
    max_line_chars: int = 100  # longer paragraphs are never boilerplate
    remove_lines: bool = True  # drop boilerplate paragraphs from kept documents
    max_line_fraction: float = 0.5  # reject a document when this share of its paragraphs is boilerplate

    def check(self, at: str) -> None:
        for i, p in enumerate(self.patterns):
            try:
                re.compile(p)
            except re.error as e:
                fail(at, f"patterns[{i}]", f"not a valid regular expression ({e})")


@dataclass
class MinLengthRule:
    enabled: bool = True  # reject short documents
    min_chars: int = 100  # characters that are not whitespace


@dataclass
class ChineseRatioRule:
    enabled: bool = True  # reject documents that are mostly not Chinese
    min_ratio: float = 0.4  # CJK characters / all non-whitespace characters


@dataclass
class ParagraphLengthRule:
    enabled: bool = True  # reject documents by their mean paragraph length
    min_avg_chars: float = 10.0  # short paragraphs on average: lists, menus, tables
    max_avg_chars: float = 5000.0  # one endless paragraph: scraped markup or code


@dataclass
class SymbolRule:
    enabled: bool = True  # reject documents heavy in symbols, digits or cut-off paragraphs
    max_symbol_ratio: float = 0.1  # symbols (Unicode S* and #*|~^_=<>@[]{}\`) / non-whitespace characters
    max_digit_ratio: float = 0.25  # digits / non-whitespace characters
    max_ellipsis_paragraph_fraction: float = 0.3  # paragraphs ending in ... or …


@dataclass
class RepetitionRule:
    enabled: bool = True  # reject repetitive documents (the Gopher repetition rules)
    max_duplicate_paragraph_fraction: float = 0.3  # paragraphs that repeat an earlier one / paragraphs
    max_duplicate_paragraph_char_fraction: float = 0.2  # characters in repeated paragraphs / characters
    top_ngram_sizes: list[int] = field(default_factory=lambda: [2, 3, 4])  # n of the most frequent n-gram checks
    top_ngram_max_fraction: list[float] = field(default_factory=lambda: [0.2, 0.18, 0.16])  # per n: its share of characters
    duplicate_ngram_sizes: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9, 10])  # n of the repeated n-gram checks
    # per n: the share of characters inside n-grams that occur more than once
    duplicate_ngram_max_fraction: list[float] = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])

    def check(self, at: str) -> None:
        for kind in ("top", "duplicate"):
            sizes, limits = getattr(self, f"{kind}_ngram_sizes"), getattr(self, f"{kind}_ngram_max_fraction")
            if len(sizes) != len(limits):
                fail(at, f"{kind}_ngram_sizes",
                     f"{len(sizes)} sizes but {len(limits)} values in {kind}_ngram_max_fraction")
            if any(n < 1 for n in sizes):
                fail(at, f"{kind}_ngram_sizes", f"n-gram sizes must be >= 1, got {sizes}")


@dataclass
class BlocklistRule:
    enabled: bool = False  # reject documents with blocked words
    file: str | None = None  # UTF-8, one word or phrase per line, '#' starts a comment line
    max_hits: int = 0  # reject a document with more hits than this

    def check(self, at: str) -> None:
        if self.enabled and not self.file:
            fail(at, "enabled", f"needs {join(at, 'file')} (one blocked word per line)")


@dataclass
class PerplexityRule:
    enabled: bool = False  # score documents with a language model (CCNet-style); needs torch and a checkpoint
    model: str | None = None  # a cpmctl checkpoint (native dir, original .pt, HF dir)
    vocab: str | None = None  # default: vocab.txt beside the checkpoint
    max_perplexity: float | None = None  # drop documents above this
    percentile_low: float | None = None  # keep the band [low, high] of this run's perplexities (CCNet)
    percentile_high: float | None = None  # upper end of that band, in percent
    batch_size: int = 8  # documents per forward pass
    max_length: int = 1024  # tokens per scored window (longer documents are scored in windows)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Dtype = "fp32"

    def check(self, at: str) -> None:
        if not self.enabled:
            return
        if not self.model:
            fail(at, "enabled", f"needs {join(at, 'model')} (a cpmctl checkpoint)")
        band = (self.percentile_low, self.percentile_high)
        if self.max_perplexity is None and band == (None, None):
            fail(at, "enabled", "set max_perplexity or percentile_low/percentile_high")
        within(self, at, "percentile_low", 0, 100)
        within(self, at, "percentile_high", 0, 100)
        if None not in band and band[0] > band[1]:
            fail(at, "percentile_low", f"an empty band: percentile_low must not exceed percentile_high, got {band}")
        at_least(self, at, "batch_size", 1)
        at_least(self, at, "max_length", 64)


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
        """The checks a loaded recipe gets (each rule section's `check`), for a recipe built in Python."""
        check_recipe(self)


def traditional_converter():
    try:
        import opencc
    except ImportError:
        raise CpmctlError("cleanup.traditional_to_simplified needs the opencc package (pip install opencc)") from None
    return opencc.OpenCC("t2s")
