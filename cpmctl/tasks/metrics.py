"""Task metrics as pure functions. Everything is character level (Chinese has no spaces to split on) and every
score is reported x100, averaged the way the CUGE benchmark does.

- ROUGE-1/2/L F1: per example, then averaged. ROUGE-L is the LCS of the whole character sequences, which is what
  rouge-chinese 1.0.3 computes on space-joined characters. ROUGE-N uses clipped n-gram counts (the ROUGE-1.5.5
  definition, = rouge-chinese with `exclusive=False`); rouge-chinese's default counts each distinct n-gram once.
  Whitespace is not a character here (rouge-chinese drops it too). Google's rouge-score drops every non-ASCII
  character and scores Chinese 0: do not use it.
- BLEU-1..4: corpus level (clipped matches and lengths summed over the corpus, the closest reference length with
  ties to the shorter, one brevity penalty), uniform weights over orders 1..n. Smoothing: an order with zero
  matches gets precision epsilon / candidates (epsilon 0.1: Chen & Cherry 2014 method 1), so one order without
  matches does not zero the score. Scored 0: a corpus without a single matching character, an empty one, and
  BLEU-n of a corpus with no n-gram of order n at all (every prediction shorter than n characters). This is
  sacrebleu's `BLEU(tokenize="char", smooth_method="floor", smooth_value=0.1, max_ngram_order=n)` exactly, and
  NLTK's `corpus_bleu` with `SmoothingFunction(epsilon=0.1).method1` on character lists whenever every prediction
  has at least n characters (NLTK counts a shorter one as 1 n-gram of order n, matching nothing);
  tests/test_metrics.py checks both.
- Distinct-n: distinct n-grams / all n-grams over all predictions (n-grams do not cross predictions).
- MRR and nDCG@k per query (exponential gain 2^rel - 1, log2 discount), averaged over queries that have at least
  one relevant document. Ties in the predicted scores keep the input order.
- Math23K: a prediction matches when it evaluates to the reference number (equations `x=...`, fractions, mixed
  numbers `1(1/2)`, percents), relative tolerance 1e-4.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections import Counter
from collections.abc import Sequence

BLEU_EPSILON = 0.1
MATH_REL_TOL = 1e-4


# ----- text units ----------------------------------------------------------------------------------------------
def chars(text: str) -> list[str]:
    """The scoring units: the characters of the text, whitespace dropped."""
    return [c for c in text if not c.isspace()]


def ngrams(units: Sequence[str], n: int) -> Counter:
    return Counter(tuple(units[i : i + n]) for i in range(len(units) - n + 1))


def _check_pairs(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


def _f1(overlap: float, predicted: int, reference: int) -> float:
    return 2.0 * overlap / (predicted + reference) if overlap > 0 else 0.0


# ----- ROUGE ---------------------------------------------------------------------------------------------------
def rouge_n(prediction: str, reference: str, n: int) -> float:
    """ROUGE-N F1 of one pair (0..1), clipped n-gram counts."""
    pred, ref = ngrams(chars(prediction), n), ngrams(chars(reference), n)
    overlap = sum((pred & ref).values())
    return _f1(overlap, sum(pred.values()), sum(ref.values()))


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (one DP row at a time)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one pair (0..1): LCS over the character sequences."""
    pred, ref = chars(prediction), chars(reference)
    return _f1(lcs_length(pred, ref), len(pred), len(ref))


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Character-level ROUGE-1/2/L F1 x100, averaged over examples."""
    _check_pairs(predictions, references)
    totals = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for p, r in zip(predictions, references):
        totals["rouge-1"] += rouge_n(p, r, 1)
        totals["rouge-2"] += rouge_n(p, r, 2)
        totals["rouge-l"] += rouge_l(p, r)
    return {k: 100.0 * v / len(predictions) for k, v in totals.items()}


# ----- BLEU and Distinct ---------------------------------------------------------------------------------------
def bleu(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    max_n: int = 4,
    epsilon: float = BLEU_EPSILON,
) -> dict[str, float]:
    """Corpus-level character BLEU-1..max_n x100. A reference may be one string or a list of strings."""
    _check_pairs(predictions, references)
    matches, totals = [0] * max_n, [0] * max_n
    pred_len = ref_len = 0
    for pred_text, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        pred = chars(pred_text)
        ref_units = [chars(r) for r in refs]
        pred_len += len(pred)
        # The reference length closest to the candidate's (shorter wins a tie), as in BLEU's definition.
        ref_len += min((abs(len(r) - len(pred)), len(r)) for r in ref_units)[1]
        for n in range(1, max_n + 1):
            counts = ngrams(pred, n)
            best = Counter()
            for r in ref_units:
                best |= ngrams(r, n)
            matches[n - 1] += sum((counts & best).values())
            totals[n - 1] += sum(counts.values())
    if pred_len == 0 or matches[0] == 0:  # nothing matches at all: 0, not epsilon-smoothed (NLTK and sacrebleu)
        return {f"bleu-{n}": 0.0 for n in range(1, max_n + 1)}
    brevity = 1.0 if pred_len > ref_len else math.exp(1.0 - ref_len / pred_len)
    log_precisions = []
    out = {}
    for n in range(1, max_n + 1):
        m, t = matches[n - 1], totals[n - 1]
        if t == 0:  # no n-gram of this order anywhere: this BLEU-n and the higher ones are 0 (sacrebleu's rule)
            out.update({f"bleu-{k}": 0.0 for k in range(n, max_n + 1)})
            break
        # method 1: a zero count becomes epsilon
        log_precisions.append(math.log((m if m > 0 else epsilon) / t))
        out[f"bleu-{n}"] = 100.0 * brevity * math.exp(sum(log_precisions) / n)
    return out


def distinct(predictions: Sequence[str], n: int) -> float:
    """Distinct-n x100: distinct character n-grams / all character n-grams over all predictions."""
    if not predictions:
        raise ValueError("no predictions to score")
    seen: set = set()
    total = 0
    for p in predictions:
        grams = ngrams(chars(p), n)
        seen.update(grams)
        total += sum(grams.values())
    return 100.0 * len(seen) / total if total else 0.0


# ----- classification ------------------------------------------------------------------------------------------
def accuracy(predictions: Sequence, labels: Sequence) -> float:
    _check_pairs(predictions, labels)
    return 100.0 * sum(p == g for p, g in zip(predictions, labels)) / len(labels)


def macro_f1(predictions: Sequence, labels: Sequence) -> float:
    """Macro-averaged F1 x100 over the classes present in the labels or the predictions."""
    _check_pairs(predictions, labels)
    scores = []
    for c in sorted(set(labels) | set(predictions), key=str):
        tp = sum(p == c and g == c for p, g in zip(predictions, labels))
        fp = sum(p == c and g != c for p, g in zip(predictions, labels))
        fn = sum(p != c and g == c for p, g in zip(predictions, labels))
        scores.append(_f1(tp, tp + fp, tp + fn))
    return 100.0 * sum(scores) / len(scores)


def char_f1(prediction: str, reference: str) -> float:
    """Character-overlap F1 of one pair (0..1), the SQuAD token F1 with characters as tokens."""
    pred, ref = Counter(chars(prediction)), Counter(chars(reference))
    return _f1(sum((pred & ref).values()), sum(pred.values()), sum(ref.values()))


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    _check_pairs(predictions, references)
    return 100.0 * sum(chars(p) == chars(r) for p, r in zip(predictions, references)) / len(references)


# ----- ranking -------------------------------------------------------------------------------------------------
def _ranked(scores: Sequence[float], relevances: Sequence[float]) -> list[float]:
    """Relevances in the order of decreasing predicted score (stable: ties keep the input order)."""
    if len(scores) != len(relevances):
        raise ValueError(f"{len(scores)} scores for {len(relevances)} documents")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return [relevances[i] for i in order]


def reciprocal_rank(scores: Sequence[float], relevances: Sequence[float]) -> float:
    for rank, rel in enumerate(_ranked(scores, relevances), 1):
        if rel > 0:
            return 1.0 / rank
    return 0.0


def dcg(relevances: Sequence[float], k: int) -> float:
    return sum((2.0**rel - 1.0) / math.log2(rank + 1) for rank, rel in enumerate(relevances[:k], 1))


def ndcg(scores: Sequence[float], relevances: Sequence[float], k: int) -> float:
    ideal = dcg(sorted(relevances, reverse=True), k)
    return dcg(_ranked(scores, relevances), k) / ideal if ideal > 0 else 0.0


def ranking(groups: Sequence[tuple[Sequence[float], Sequence[float]]], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """MRR and nDCG@k x100 over queries; `groups` holds (predicted scores, gold relevances) per query. Queries
    without any relevant document are left out (no ranking of them can be right or wrong)."""
    judged = [(s, r) for s, r in groups if any(x > 0 for x in r)]
    if not judged:
        raise ValueError("no query has a relevant document (relevance > 0)")
    out = {"mrr": 100.0 * sum(reciprocal_rank(s, r) for s, r in judged) / len(judged)}
    for k in ks:
        out[f"ndcg@{k}"] = 100.0 * sum(ndcg(s, r, k) for s, r in judged) / len(judged)
    out["queries"] = len(judged)
    return out


# ----- Math23K numeric answers ---------------------------------------------------------------------------------
_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
}
_FULL_WIDTH = str.maketrans({"（": "(", "）": ")", "×": "*", "÷": "/", "＝": "=", "－": "-", "＋": "+", "％": "%",
                             "：": ":", "．": ".", "，": ","})
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)?%?")


def _eval_node(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval_node(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")


def _arithmetic(text: str) -> str:
    """Math23K notation -> Python arithmetic: 1(1/2) is 1 + 1/2, 50% is 50/100, ^ is a power."""
    text = re.sub(r"(\d+(?:\.\d+)?)\((\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)\)", r"(\1+\2/\3)", text)
    text = re.sub(r"(\d+(?:\.\d+)?)%", r"(\1/100)", text)
    return text.replace("^", "**")


def parse_number(text: str) -> float | None:
    """The number a prediction or answer stands for, or None. An equation's right-hand side is evaluated; text
    that is not arithmetic falls back to its last number."""
    text = text.translate(_FULL_WIDTH).replace(" ", "").strip()
    if "=" in text:
        text = text.rsplit("=", 1)[1]
    if not text:
        return None
    try:
        value = _eval_node(ast.parse(_arithmetic(text), mode="eval"))
        return value if math.isfinite(value) else None
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        pass
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        value = _eval_node(ast.parse(_arithmetic(found[-1]), mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def math_answer_match(prediction: str, reference: str, rel_tol: float = MATH_REL_TOL) -> bool:
    pred, ref = parse_number(prediction), parse_number(reference)
    if pred is None or ref is None:
        return False
    return math.isclose(pred, ref, rel_tol=rel_tol, abs_tol=1e-9)


def math_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    _check_pairs(predictions, references)
    return 100.0 * sum(math_answer_match(p, r) for p, r in zip(predictions, references)) / len(references)
