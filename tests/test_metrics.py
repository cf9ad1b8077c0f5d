"""Metrics against the libraries users know (ROUGE: rouge-chinese 1.0.3; BLEU: sacrebleu and NLTK; Distinct:
NLTK's n-grams) and hand-computed cases."""

from __future__ import annotations

import math
import random
import time

import pytest

from cpmctl.tasks import metrics as M

ALPHABET = "我爱北京天安门广场的人民春夏秋冬山水"
HAND_PAIRS = [
    ("我爱北京天安门", "我爱天安门广场"),
    ("今天天气不错", "今天天气很好"),
    ("春天来了", "春天来了"),
    ("山水", "天安门广场"),
    ("的的的的", "的人的"),
    ("人", "人民"),
    ("北京。天安门！", "北京的天安门"),  # sentence punctuation: rouge-chinese splits sentences, the scores must not move
]


def _random_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30)))  # noqa: E731
    return [(word(), word()) for _ in range(n)]


def _rouge_chinese(preds, refs, exclusive: bool):
    rouge_chinese = pytest.importorskip("rouge_chinese")
    scorer = rouge_chinese.Rouge(exclusive=exclusive)
    # Character level: rouge-chinese splits on spaces, so the characters are joined with spaces.
    return scorer.get_scores([" ".join(p) for p in preds], [" ".join(r) for r in refs])


@pytest.mark.parametrize("pairs", [HAND_PAIRS, _random_pairs(200)], ids=["hand", "random"])
def test_rouge_equals_rouge_chinese_per_pair(pairs):
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    for (p, r), ref_default, ref_counts in zip(pairs, _rouge_chinese(preds, refs, True), _rouge_chinese(preds, refs, False)):
        # ROUGE-L: identical to rouge-chinese's default.
        assert M.rouge_l(p, r) == pytest.approx(ref_default["rouge-l"]["f"], abs=1e-6), (p, r)
        # ROUGE-1/2 with clipped counts: rouge-chinese with exclusive=False.
        assert M.rouge_n(p, r, 1) == pytest.approx(ref_counts["rouge-1"]["f"], abs=1e-6), (p, r)
        assert M.rouge_n(p, r, 2) == pytest.approx(ref_counts["rouge-2"]["f"], abs=1e-6), (p, r)


def test_rouge_average_equals_rouge_chinese_avg():
    pairs = _random_pairs(50, seed=3) + HAND_PAIRS
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    rouge_chinese = pytest.importorskip("rouge_chinese")
    avg = rouge_chinese.Rouge(exclusive=False).get_scores([" ".join(p) for p in preds], [" ".join(r) for r in refs],
                                                          avg=True)
    ours = M.rouge(preds, refs)
    for key in ("rouge-1", "rouge-2", "rouge-l"):
        assert ours[key] == pytest.approx(100 * avg[key]["f"], abs=1e-4)


def test_rouge_hand_computed_and_whitespace():
    # LCS(我爱北京天安门, 我爱天安门广场) = 我爱天安门 (5): F = 2 * 5 / (7 + 7)
    assert M.rouge_l("我爱北京天安门", "我爱天安门广场") == pytest.approx(10 / 14)
    assert M.rouge_l("我 爱\n北京", "我爱北京") == 1.0  # whitespace is not a character
    assert M.rouge_l("", "我爱") == 0.0
    # Google's rouge-score would give 0 here (it drops non-ASCII); character level gives the true overlap.
    assert M.rouge(["今天天气不错"], ["今天天气很好"])["rouge-1"] == pytest.approx(100 * 2 * 4 / 12)


def test_bleu_hand_computed():
    # pred 猫坐在垫子上 / ref 猫在垫子上面, 6 characters each (BP = 1):
    # 1-grams 5/6, 2-grams 3/5 (在垫 垫子 子上), 3-grams 2/4 (在垫子 垫子上), 4-grams 1/3 (在垫子上)
    got = M.bleu(["猫坐在垫子上"], ["猫在垫子上面"])
    assert got["bleu-1"] == pytest.approx(100 * 5 / 6)
    assert got["bleu-2"] == pytest.approx(100 * math.sqrt(5 / 6 * 3 / 5))
    assert got["bleu-3"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4) ** (1 / 3))
    assert got["bleu-4"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** (1 / 4))


def test_bleu_smoothing_and_brevity_hand_computed():
    # pred 猫在 / ref 狗在家: 1-grams 1/2; 2-grams 0/1 -> smoothed 0.1/1; no 3-grams at all -> BLEU-3 and -4 are 0
    # (sacrebleu's rule; NLTK would count 0 of 1 and smooth it); c = 2 < r = 3 -> BP = exp(1 - 3/2)
    got = M.bleu(["猫在"], ["狗在家"])
    bp = math.exp(-0.5)
    assert got["bleu-1"] == pytest.approx(100 * bp * 0.5)
    assert got["bleu-2"] == pytest.approx(100 * bp * math.sqrt(0.5 * 0.1))
    assert got["bleu-3"] == got["bleu-4"] == 0.0


def test_bleu_is_corpus_level():
    # Counts are summed before dividing: (2 + 0) / (2 + 2) unigram matches, lengths 4 vs 4.
    got = M.bleu(["春天", "山水"], ["春天", "秋冬"])
    assert got["bleu-1"] == pytest.approx(50.0)
    # Multiple references: clip by the best reference; the closest length (5, not 2) sets BP = exp(1 - 5/4).
    assert M.bleu(["春天来了"], [["春天", "春天来了吗"]])["bleu-1"] == pytest.approx(100.0 * math.exp(-0.25))


# ----- BLEU against sacrebleu and NLTK: the same pairs, the libraries set to cpmctl's definition -----------------
def _bleu_pairs() -> list[tuple[str, str]]:
    # Random pairs with a small alphabet (every order matches somewhere), the hand pairs, and text with spaces,
    # ASCII and punctuation (characters are the units; whitespace is not one).
    extra = [("hello 世界 ok", "hello世界, ok"), ("A B C", "ABC"), ("北京　天安门", "北京天安门。")]
    return _random_pairs(60, seed=3) + HAND_PAIRS + extra


def _sacrebleu(preds, refs, n: int) -> float:
    from sacrebleu.metrics import BLEU

    # tokenize="char": every character a token, whitespace dropped (as cpmctl's units); "floor" with 0.1 is
    # smoothing method 1 with cpmctl's epsilon; max_ngram_order=n makes BLEU-n.
    scorer = BLEU(tokenize="char", smooth_method="floor", smooth_value=0.1, max_ngram_order=n)
    return scorer.corpus_score(preds, [refs]).score


def _nltk(preds, refs, n: int) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    # Character lists as tokens; uniform weights over 1..n; method 1 with cpmctl's epsilon.
    references = [[M.chars(r)] if isinstance(r, str) else [M.chars(x) for x in r] for r in refs]
    score = corpus_bleu(references, [M.chars(p) for p in preds], weights=(1.0 / n,) * n,
                        smoothing_function=SmoothingFunction(epsilon=0.1).method1)
    return 100.0 * score


@pytest.mark.parametrize("slice_", [slice(None), slice(0, 1), slice(60, 61), slice(63, 64)],
                         ids=["corpus", "one-random", "one-hand", "no-4gram-match"])
def test_bleu_equals_sacrebleu_and_nltk(slice_):
    pytest.importorskip("sacrebleu")
    pytest.importorskip("nltk")
    pairs = _bleu_pairs()[slice_]
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    ours = M.bleu(preds, refs)
    for n in range(1, 5):
        assert ours[f"bleu-{n}"] == pytest.approx(_sacrebleu(preds, refs, n), rel=1e-9, abs=1e-9), n
        # NLTK counts a prediction shorter than n characters as one unmatched n-gram (its per-sentence
        # max(1, count) denominator); on predictions of at least n characters it is the same BLEU.
        long = [(p, r) for p, r in pairs if len(M.chars(p)) >= n]
        if long:
            lp, lr = [p for p, _ in long], [r for _, r in long]
            assert M.bleu(lp, lr)[f"bleu-{n}"] == pytest.approx(_nltk(lp, lr, n), rel=1e-9, abs=1e-9), n


def test_bleu_multiple_references_and_no_match_equal_the_libraries():
    pytest.importorskip("sacrebleu")
    pytest.importorskip("nltk")
    from sacrebleu.metrics import BLEU

    preds = ["春天来了", "山水之间", "我爱北京"]
    refs = [["春天", "春天来了吗"], ["山水", "山水画之间"], ["我爱天安门", "北京"]]
    ours = M.bleu(preds, refs)
    streams = [[r[0] for r in refs], [r[1] for r in refs]]  # sacrebleu takes one stream per reference slot
    for n in range(1, 5):
        theirs = BLEU(tokenize="char", smooth_method="floor", smooth_value=0.1, max_ngram_order=n)
        assert ours[f"bleu-{n}"] == pytest.approx(theirs.corpus_score(preds, streams).score, rel=1e-9)
        assert ours[f"bleu-{n}"] == pytest.approx(_nltk(preds, refs, n), rel=1e-9)
    # Not one matching character: 0 in all three, not an epsilon-smoothed positive score.
    assert M.bleu(["山水"], ["春天"]) == {f"bleu-{n}": 0.0 for n in range(1, 5)}
    assert _sacrebleu(["山水"], ["春天"], 4) == 0.0 and _nltk(["山水"], ["春天"], 4) == 0.0


def test_bleu_of_predictions_shorter_than_n_equals_sacrebleu():
    """Where the libraries disagree: predictions shorter than n characters. cpmctl counts the n-grams there are
    (none, for a 1-character prediction and n = 2), as sacrebleu does; NLTK counts one unmatched n-gram each."""
    pytest.importorskip("sacrebleu")
    pytest.importorskip("nltk")
    preds, refs = ["春天", "山"], ["春天来了", "山水"]
    ours = M.bleu(preds, refs)
    for n in range(1, 5):
        assert ours[f"bleu-{n}"] == pytest.approx(_sacrebleu(preds, refs, n), rel=1e-9, abs=1e-9)
    assert ours["bleu-2"] == pytest.approx(100 * math.exp(1 - 6 / 3))  # 1 of 1 bigrams, brevity exp(1 - 6/3)
    assert _nltk(preds, refs, 2) == pytest.approx(100 * math.exp(1 - 6 / 3) * math.sqrt(1 / 2))  # 1 of "2"
    assert ours["bleu-3"] == ours["bleu-4"] == 0.0  # no trigram anywhere


# ----- Distinct against NLTK's n-grams -------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_distinct_equals_nltk_ngrams(n):
    nltk_util = pytest.importorskip("nltk.util")
    preds = [p for p, _ in _bleu_pairs()]
    grams = [g for p in preds for g in nltk_util.ngrams(M.chars(p), n)]  # per prediction: none cross a boundary
    assert M.distinct(preds, n) == pytest.approx(100.0 * len(set(grams)) / len(grams), rel=1e-12)


def test_distinct_hand_computed():
    # unigrams 好 好 好 好 的: 2 distinct of 5; bigrams 好好 好好 好的: 2 of 3
    assert M.distinct(["好好好", "好的"], 1) == pytest.approx(40.0)
    assert M.distinct(["好好好", "好的"], 2) == pytest.approx(200 / 3)
    assert M.distinct(["好"], 2) == 0.0


def test_accuracy_and_f1():
    assert M.accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 75.0
    # class 0: tp1 -> 1; class 1: tp1 fn1 -> 2/3; class 2: tp1 fp1 -> 2/3
    assert M.macro_f1([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(100 * (1 + 2 / 3 + 2 / 3) / 3)
    assert M.char_f1("北京天安门", "天安门广场") == pytest.approx(2 * 3 / 10)
    with pytest.raises(ValueError):
        M.accuracy([0], [0, 1])


def test_mrr_and_ndcg_hand_computed():
    groups = [
        ([0.1, 0.9, 0.5], [1, 0, 2]),  # ranked relevances 0, 2, 1: first relevant at rank 2
        ([0.3, 0.2], [0, 0]),  # no relevant document: left out
        ([2.0, 1.0], [1, 0]),  # perfect
    ]
    dcg = 3 / math.log2(3) + 1 / 2  # gains (2^rel - 1) / log2(rank + 1): 0 + 3/log2(3) + 1/log2(4)
    ideal = 3 + 1 / math.log2(3)
    got = M.ranking(groups, ks=(1, 3))
    assert got["queries"] == 2
    assert got["mrr"] == pytest.approx(100 * (0.5 + 1.0) / 2)
    assert got["ndcg@1"] == pytest.approx(100 * (0.0 + 1.0) / 2)
    assert got["ndcg@3"] == pytest.approx(100 * (dcg / ideal + 1.0) / 2)
    # Ties keep the input order.
    assert M.reciprocal_rank([1.0, 1.0], [0, 1]) == 0.5
    with pytest.raises(ValueError, match="no query"):
        M.ranking([([1.0], [0])])


@pytest.mark.parametrize(
    "text, value",
    [("x=(11-1)*2", 20.0), ("x=12-3+5", 14.0), ("3(1/2)", 3.5), ("x=200*80%", 160.0), ("7/3", 7 / 3),
     ("答案是14个", 14.0), ("x＝（3+4）×2", 14.0), ("2^3", 8.0), ("-1.5", -1.5)],
)
def test_parse_number(text, value):
    assert M.parse_number(text) == pytest.approx(value)


def test_math_answer_match():
    assert M.math_answer_match("x=7/3", "7/3")
    assert M.math_answer_match("2.3333", "7/3")  # within the relative tolerance 1e-4
    assert not M.math_answer_match("2.3", "7/3")
    assert M.math_answer_match("x=150*(1+20%)", "180")
    assert M.math_answer_match("0.5", "50%")
    assert not M.math_answer_match("不知道", "3")
    assert not M.math_answer_match("x=1/0", "3")
    start = time.perf_counter()
    M.parse_number("9**9**9**9")  # refused, not computed
    assert time.perf_counter() - start < 1.0
    assert M.math_accuracy(["x=1+1", "3", "x=5"], ["2", "3", "4"]) == pytest.approx(200 / 3)
