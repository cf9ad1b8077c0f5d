"""Filter rules on hand-written Chinese examples, the recipe, the perplexity scorer and the `data filter` command."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cpmctl import CpmctlError
from cpmctl.data.filter_rules import (
    Boilerplate,
    DocumentFilter,
    check_chinese_ratio,
    check_min_length,
    check_paragraph_length,
    check_repetition,
    check_symbols,
    clean_text,
    trie_regex,
    unit_codes,
    units,
)
from cpmctl.data.recipe import (
    BoilerplateRule,
    ChineseRatioRule,
    FilterRecipe,
    MinLengthRule,
    ParagraphLengthRule,
    RepetitionRule,
    SymbolRule,
)
from cpmctl.recipe import load_recipe
from tests.conftest import run_cli, tiny_config

REPO = Path(__file__).resolve().parent.parent

GOOD = (
    "北京时间昨天晚上，国家统计局发布了最新的经济数据。数据显示，今年前三个季度国内生产总值同比增长百分之五左右，"
    "消费对经济增长的贡献率明显提高。\n"
    "专家认为，随着一系列稳增长政策落地见效，市场信心正在逐步恢复，服务业和制造业都出现了回暖的迹象。"
    "不过，外部环境依然复杂，部分行业的需求仍然偏弱。\n"
    "分析人士建议，下一阶段应继续扩大内需，加大对科技创新和中小企业的支持力度，推动经济持续健康发展。"
)


def cli(capsys, *args):
    code, out, err = run_cli(capsys, "data", *args)
    return subprocess.CompletedProcess(args, code, out, err)


def test_good_text_passes_every_default_rule():
    text, rule, reason, _ = DocumentFilter(FilterRecipe())(GOOD)
    assert rule is None, reason
    assert text == GOOD


def test_min_length():
    rule = MinLengthRule(min_chars=20)
    assert check_min_length("今天天气不错。", rule) == "7 characters < 20"
    assert check_min_length("今天 天气 不错，我们一起去公园散步吧，顺便买点水果。", rule) is None  # spaces not counted


def test_chinese_ratio():
    rule = ChineseRatioRule(min_ratio=0.4)
    assert check_chinese_ratio("This page is mostly English text with 一点中文.", rule).startswith("Chinese characters 0.1")
    assert check_chinese_ratio("这是一段中文，夹杂少量 English。", rule) is None


def test_paragraph_length():
    rule = ParagraphLengthRule(min_avg_chars=10, max_avg_chars=200)
    menu = "首页\n新闻\n体育\n财经\n科技\n娱乐"
    assert "average paragraph 2.0 characters < 10" in check_paragraph_length(menu, rule)
    assert "> 200" in check_paragraph_length("长" * 500, rule)
    assert check_paragraph_length(GOOD, rule) is None


def test_symbols_digits_and_ellipsis():
    rule = SymbolRule()
    assert "symbol ratio" in check_symbols("★★★★★好评如潮★★★★★限时特价★★★★★", rule)
    assert "digit ratio" in check_symbols("订单号：2023110512345678901234，电话13800138000", rule)
    teaser = "这部电影讲述了一个感人的故事...\n男主角为了救出女主角...\n最后的结局让所有人都…\n真正好看的部分在后面"
    assert "ellipsis" in check_symbols(teaser, rule)
    assert check_symbols(GOOD, rule) is None


def test_repetition_rules():
    rule = RepetitionRule()
    repeated_lines = "\n".join(["欢迎光临本店，全场商品八折优惠"] * 3 + ["今天的天气非常好，适合出门散步"])
    assert "duplicate paragraphs 0.50" in check_repetition(repeated_lines, rule)
    spam = "买手机上京东买手机上京东" * 20 + "。其他的内容并不多。"
    reason = check_repetition(spam, rule)
    assert reason is not None and ("top 2-gram" in reason or "duplicate" in reason)
    assert units("我用Python 3写代码。") == ["我", "用", "Python", "3", "写", "代", "码"]
    codes, lengths = unit_codes("我用Python 3写代码。Python")
    assert lengths.tolist() == [1, 1, 6, 1, 1, 1, 1, 6] and codes[2] == codes[7] != codes[3]
    assert check_repetition(GOOD, rule) is None


def test_duplicate_ngram_rule_alone():
    rule = RepetitionRule(max_duplicate_paragraph_fraction=1.0, max_duplicate_paragraph_char_fraction=1.0,
                          top_ngram_sizes=[], top_ngram_max_fraction=[])
    # A long phrase repeated in different paragraphs: no duplicate paragraph, but duplicate 5-grams everywhere.
    text = "\n".join(f"第{n}条：中华人民共和国国务院办公厅关于进一步加强管理的通知" for n in "一二三四")
    assert "duplicate 5-grams" in check_repetition(text, rule)


def test_boilerplate_lines_removed_or_document_rejected():
    b = Boilerplate(BoilerplateRule())
    doc = GOOD + "\n点击查看更多精彩内容\n京ICP备12345678号"
    text, reason, removed = b.apply(doc)
    assert reason is None and removed == 2 and text == GOOD
    assert b.is_boilerplate("本网站使用 Cookies 以改善体验") and b.is_boilerplate("Copyright 2023 某某公司")
    nav = "首页 > 新闻 > 国内\n上一篇：股市收盘\n下一篇：天气预报\n今天股市小幅上涨。"
    text, reason, removed = b.apply(nav)
    assert reason == "3 of 4 paragraphs are boilerplate"
    # A long paragraph that merely mentions a phrase is content, not boilerplate.
    long = "我们在这篇文章里讨论为什么很多网站都会放一个“点击查看更多”的按钮，以及这种设计对阅读体验的影响，" * 3
    assert not b.is_boilerplate(long)


def test_blocklist_with_trie_regex(tmp_path):
    words = tmp_path / "blocked.txt"
    words.write_text("# 注释行\n赌博\n赌博网站\n违禁品\nBadWord\n", encoding="utf-8")
    recipe = load_recipe(FilterRecipe, None, ["blocklist.enabled=true", f"blocklist.file={words}"])
    from cpmctl.data.filter_rules import load_blocklist

    f = DocumentFilter(recipe, load_blocklist(words))
    _, rule, reason, _ = f(GOOD + "\n这里有一个赌博网站的广告。")
    assert rule == "blocklist" and "'赌博网站'" in reason
    _, rule, _, _ = f(GOOD + "\nthis has a badword in it")
    assert rule == "blocklist"
    assert f(GOOD)[1] is None
    assert trie_regex(["ab", "abc", "b"]).findall("abcab b") == ["abc", "ab", "b"]


# ----- the batched counts against the per-document rules ------------------------------------------------------------
def _varied_texts(n: int, seed: int = 0) -> list[str]:
    """Documents mixing every kind of character the rules count: CJK (also plane 2), ASCII words, fullwidth and
    accented letters, digits of other scripts, symbols of planes 0-1, control and zero-width characters, odd
    whitespace, line breaks, ellipses, private-use stand-ins, repeated phrases and paragraphs, boilerplate."""
    import random

    rng = random.Random(seed)
    pieces = [GOOD, "北京时间", "国内生产总值同比增长", "Python", "GPU x86_64", "ＡＢＣ", "Ünïcödé", "٣٤٥", "①②", "𠀀𠀁",
              "©®™", "€$", "→✓", "🙂", "#*|", "\x07", "\u200b", "\ufeff", "\u3000", "\t", "  ", "\r\n", "\u2028", "\x85",
              "...", "…", "\n", "\n\n", " \n", "\U000F0001", "\U000F0000", "\ud800", "点击查看更多", "上一篇：某某",
              "京ICP备123号", "首页 > 新闻", "Copyright 2023", "COOKIES", "哈哈哈哈", "买手机上京东"]
    texts = []
    for _ in range(n):
        parts = [rng.choice(pieces) for _ in range(rng.randint(0, 40))]
        if rng.random() < 0.3:  # repetition near the limits
            parts += [rng.choice(pieces)] * rng.randint(2, 30)
        if rng.random() < 0.2:
            parts = parts * 2
        texts.append("".join(parts))
    return texts


def _reference(f: DocumentFilter, text: str):
    """The rules one by one on one text, counted with regular expressions (the code before batching)."""
    edits = {"cleaned": False, "boilerplate_removed": 0}
    cleaned = clean_text(text)
    edits["cleaned"] = cleaned != text
    text = cleaned
    if not text:
        return text, "min_length", "no text", edits
    text, reason, removed = f.boilerplate.apply(text)
    edits["boilerplate_removed"] = removed
    if reason:
        return text, "boilerplate", reason, edits
    if not text:
        return text, "min_length", "no text left after boilerplate removal", edits
    r = f.recipe
    for name, check, rule in (("min_length", check_min_length, r.min_length),
                              ("chinese_ratio", check_chinese_ratio, r.chinese_ratio),
                              ("paragraph_length", check_paragraph_length, r.paragraph_length),
                              ("symbols", check_symbols, r.symbols), ("repetition", check_repetition, r.repetition)):
        reason = check(text, rule)
        if reason:
            return text, name, reason, edits
    return text, None, None, edits


def test_batch_equals_the_rules_one_by_one():
    texts = _varied_texts(1500)
    lenient = load_recipe(FilterRecipe, None, ["min_length.min_chars=5", "chinese_ratio.min_ratio=0.05",
                                               "symbols.max_symbol_ratio=0.5", "paragraph_length.min_avg_chars=2"])
    for recipe in (FilterRecipe(), lenient):
        f = DocumentFilter(recipe)
        got = f.batch(texts)
        want = [_reference(f, t) for t in texts]
        assert got == want
        rules = {w[1] for w in want}
        assert {"repetition", "boilerplate", "symbols", None} <= rules or recipe is not lenient, rules
    assert [f(t) for t in texts[:50]] == want[:50]


def test_class_counts_match_the_regex_counts():
    import random

    from cpmctl.data import filter_rules as fr
    from cpmctl.data.textstats import CJK, DIGIT, SYMBOL, WS, class_counts

    rng = random.Random(1)
    texts = ["".join(chr(rng.randrange(0x110000)) for _ in range(rng.randint(0, 300))) for _ in range(200)]
    texts += ["".join(chr(rng.randrange(0x3100)) for _ in range(200)) for _ in range(200)] + _varied_texts(200, 2)
    c = class_counts(texts)
    for i, t in enumerate(texts):
        assert c[WS][i] == sum(map(len, fr._WHITESPACE.findall(t)))
        assert c[CJK][i] == len(fr._CJK.findall(t))
        assert c[DIGIT][i] == len(fr._DIGIT.findall(t))
        assert c[SYMBOL][i] == len(t) - len(t.translate(fr._symbol_table()))


def test_repetition_bound_never_clears_a_rejected_text():
    from cpmctl.data.filter_rules import ngram_repetition_reason
    from cpmctl.data.textstats import repetition_certain

    rule = RepetitionRule()
    texts = _varied_texts(1500, 3)
    top = list(zip(rule.top_ngram_sizes, rule.top_ngram_max_fraction))
    dup = list(zip(rule.duplicate_ngram_sizes, rule.duplicate_ngram_max_fraction))
    certain = repetition_certain(texts, top, dup)
    rejected = [ngram_repetition_reason(t, rule) is not None for t in texts]
    assert not any(c and r for c, r in zip(certain, rejected))
    assert sum(rejected) > 100 and sum(certain) > 150  # both kinds occur: the test can fail either way


def test_cleanup_and_traditional_to_simplified():
    dirty = "第一段\u200b文字\x07，\u3000\u3000有  多余   空格。\r\n\r\n\ufeff第二段\t文字。  "
    assert clean_text(dirty) == "第一段文字， 有 多余 空格。\n第二段 文字。"
    pytest.importorskip("opencc")
    recipe = load_recipe(FilterRecipe, None, ["cleanup.traditional_to_simplified=true", "min_length.enabled=false"])
    text, rule, _, edits = DocumentFilter(recipe)("這個軟體的簡體中文轉換很方便，歡迎大家使用。")
    assert text == "这个软体的简体中文转换很方便，欢迎大家使用。" and rule is None and edits["cleaned"]


def test_each_rule_can_be_switched_off():
    short = "太短了。"
    assert DocumentFilter(FilterRecipe())(short)[1] == "min_length"
    off = load_recipe(FilterRecipe, None, ["min_length.enabled=false", "paragraph_length.enabled=false"])
    assert DocumentFilter(off)(short)[1] is None


def test_recipe_file_and_errors(tmp_path, capsys):
    recipe = load_recipe(FilterRecipe, REPO / "recipes" / "data" / "filter.yaml", ["min_length.min_chars=5"])
    assert recipe.min_length.min_chars == 5 and recipe.chinese_ratio.min_ratio == 0.4
    r = cli(capsys, "filter", "--recipe", REPO / "recipes/data/filter.yaml", "--print-recipe", "symbols.max_digit_ratio=0.5")
    assert r.returncode == 0 and "max_digit_ratio: 0.5" in r.stdout
    r = cli(capsys, "filter", "-i", "x.jsonl", "-o", "y.jsonl", "min_length.min_charz=5")
    assert r.returncode == 2 and "unknown recipe key 'min_length.min_charz'" in r.stderr
    with pytest.raises(CpmctlError, match="percentile_low must not exceed"):
        load_recipe(FilterRecipe, None, ["perplexity.enabled=true", "perplexity.model=m", "perplexity.percentile_low=80",
                                         "perplexity.percentile_high=20"]).validate()
    with pytest.raises(CpmctlError, match="boilerplate.patterns\\[0\\]"):
        load_recipe(FilterRecipe, None, ["boilerplate.patterns=['(unclosed']"]).validate()


def test_filter_command_writes_kept_rejected_and_counts(tmp_path, capsys):
    docs = [
        {"id": 1, "text": GOOD + "\n点击查看更多", "url": "a"},
        {"id": 2, "text": "太短。"},
        {"id": 3, "text": "English only page. " * 20},
        {"id": 4, "text": "\n".join(["重复的段落内容在这里出现了很多次"] * 5 + [GOOD])},
    ]
    src = tmp_path / "raw.jsonl"
    src.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs) + "{broken\n", encoding="utf-8")
    out, rejected = tmp_path / "clean.jsonl", tmp_path / "rejected.jsonl"
    r = cli(capsys, "filter", "-i", src, "-o", out, "--rejected", rejected, "--json", "-w", "1")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["kept"] == 1 and summary["documents"] == 4 and summary["malformed"] == 1
    assert summary["rejected"]["min_length"] == 1 and summary["rejected"]["chinese_ratio"] == 1
    assert summary["rejected"]["repetition"] == 1 and summary["boilerplate_paragraphs_removed"] == 1
    kept = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert kept == [{"id": 1, "text": GOOD, "url": "a"}]  # other fields carried through, boilerplate removed
    rej = [json.loads(line) for line in rejected.read_text(encoding="utf-8").splitlines()]
    assert [(x["id"], x["filter"]["rule"]) for x in rej] == [(2, "min_length"), (3, "chinese_ratio"), (4, "repetition")]
    assert rej[0]["filter"]["source"].endswith("raw.jsonl:2")
    # The human summary is a table with every rule.
    r = cli(capsys, "filter", "-i", src, "-o", tmp_path / "c2.jsonl", "-w", "2")
    assert r.returncode == 0 and "repetition" in r.stdout and "kept" in r.stdout
    assert (tmp_path / "c2.jsonl").read_bytes() == out.read_bytes()
    r = cli(capsys, "filter", "-i", src, "-o", tmp_path / "c3.jsonl", "--strict")
    assert r.returncode == 2 and "raw.jsonl:5: not valid JSON" in r.stderr and not (tmp_path / "c3.jsonl").exists()


def test_filter_text_format_keeps_the_format(tmp_path, capsys):
    src = tmp_path / "raw.txt"
    src.write_text(GOOD.replace("\n", "<n>") + "\n" + "太短。\n", encoding="utf-8")
    r = cli(capsys, "filter", "-i", src, "-o", tmp_path / "clean.txt", "--json")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "clean.txt").read_text(encoding="utf-8") == GOOD.replace("\n", "<n>") + "\n"
    r = cli(capsys, "filter", "-i", src, "-o", tmp_path / "clean.jsonl")
    assert r.returncode == 2 and "the input is text but the output name says jsonl" in r.stderr


# ----- perplexity ----------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_model(tiny_vocab, tmp_path):
    from cpmctl.model.ant import build_model
    from cpmctl.model.checkpoint import save_native
    from cpmctl.model.tokenizer import CPMAntTokenizer

    tok = CPMAntTokenizer(tiny_vocab)
    model = build_model(tiny_config(tok.vocab_size), seed=0).eval()
    path = save_native(model, tmp_path / "model", vocab=tiny_vocab)
    return model, tok, path


def test_score_documents_matches_a_direct_computation(tiny_model):
    from cpmctl.model.perplexity import score_documents

    model, tok, _ = tiny_model
    texts = ["今天天气不错，我们去公园。", "中国的经济发展很快。" * 6, "老师和学生", "\u2603"]  # the last: all <unk>
    scores = score_documents(model, tok, texts, max_length=64, batch_size=3)
    V, p = model.config.vocab_size, model.config.prompt_length
    for text, score in zip(texts, scores):
        ids = tok.encode_for_model(text)
        assert score.tokens == len(ids) and score.chars == len(text)
        nll = 0.0
        for start in range(0, len(ids), 64 - p - 1):  # windows of max_length, each prompt + <s> + piece
            piece = ids[start : start + 64 - p - 1]
            seq = torch.tensor([[V + 2 * p + j for j in range(p)] + [6] + piece])
            seg = torch.tensor([[0] * p + [2] * (1 + len(piece))])
            ctx = torch.tensor([[True] * (p + 1) + [False] * len(piece)])
            with torch.no_grad():
                logits = model(seq, seg, ctx)
            nll += F.cross_entropy(logits[0, p : p + len(piece)], torch.tensor(piece), reduction="sum").item()
        assert score.nll_sum == pytest.approx(nll, rel=1e-4, abs=1e-4)
    assert len(tok.encode_for_model(texts[1])) > 64 - p - 1  # the long text really spans two windows
    assert scores[3].tokens == 0 and math.isinf(scores[3].perplexity)


def test_perplexity_rule_in_the_filter_command(tiny_model, tmp_path, capsys):
    from cpmctl.model.perplexity import score_documents

    model, tok, path = tiny_model
    texts = [f"{GOOD}\n{'今天天气不错' * (i + 1)}" for i in range(6)]
    src = tmp_path / "raw.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    ppl = [s.perplexity for s in score_documents(model, tok, texts, max_length=128)]
    threshold = sorted(ppl)[3]
    common = ["perplexity.enabled=true", f"perplexity.model={path}", "perplexity.max_length=128",
              "perplexity.device=cpu", "repetition.enabled=false"]
    r = cli(capsys, "filter", "-i", src, "-o", tmp_path / "a.jsonl", "--rejected", tmp_path / "rej.jsonl", "--json",
            *common, f"perplexity.max_perplexity={threshold}")
    assert r.returncode == 0, r.stderr
    kept = [json.loads(x)["text"] for x in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert kept == [t for t, s in zip(texts, ppl) if s <= threshold] and len(kept) == 4
    rej = [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {x["filter"]["rule"] for x in rej} == {"perplexity"} and len(rej) == 2
    # A percentile band (CCNet): keep the middle of this run's distribution.
    r = cli(capsys, "filter", "-i", src, "-o", tmp_path / "b.jsonl", "--json", *common,
            "perplexity.percentile_low=20", "perplexity.percentile_high=80")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    kept = [json.loads(x)["text"] for x in (tmp_path / "b.jsonl").read_text(encoding="utf-8").splitlines()]
    assert kept == [t for t, s in zip(texts, ppl) if summary["perplexity"]["low"] <= s <= summary["perplexity"]["high"]]
    assert summary["rejected"]["perplexity"] == 6 - len(kept) and 0 < len(kept) < 6
    assert not list(tmp_path.glob(".filter-spool*"))


def test_batch_equals_the_rules_one_by_one_at_random_thresholds():
    """The vectorised pre-check of the counted rules (DocumentFilter._maybe_rejected) never passes a text a rule
    rejects, and a text the cleanup or boilerplate rule changes is counted afresh: thresholds drawn near the
    texts' own ratios, so every rule decides some texts both ways."""
    import random

    rng = random.Random(7)
    texts = _varied_texts(400, 4)
    for _ in range(6):
        recipe = load_recipe(FilterRecipe, None, [
            f"min_length.min_chars={rng.randint(0, 60)}", f"chinese_ratio.min_ratio={rng.uniform(0, 0.6):.3f}",
            f"paragraph_length.min_avg_chars={rng.uniform(0, 12):.2f}", f"symbols.max_symbol_ratio={rng.uniform(0, 0.3):.3f}",
            f"symbols.max_digit_ratio={rng.uniform(0, 0.3):.3f}",
            f"symbols.max_ellipsis_paragraph_fraction={rng.choice([-0.1, 0.0, 0.2, 0.5])}",
            f"boilerplate.max_line_fraction={rng.uniform(0.2, 1):.2f}"])
        f = DocumentFilter(recipe)
        got = f.batch(texts)
        assert got == [_reference(f, t) for t in texts]
        assert len({g[1] for g in got}) >= 4
