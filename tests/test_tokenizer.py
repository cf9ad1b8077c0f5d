"""The tokenizer against a plain re-implementation of the original algorithm (CPM-Live cpm_live/tokenizers/ant.py):
vocabulary lines stripped, jieba.cut with HMM on, greedy longest match from the end of each piece, no max-length
shortcut, no memo. On the real ant.txt when ../shared is present, on the tiny vocabulary always."""

from __future__ import annotations

import random

import jieba
import pytest

from cpmctl import CpmctlError
from cpmctl.model.tokenizer import BOS, EOS, NEWLINE, PAD, SPACE, UNK, CPMAntTokenizer

# ----- the oracle ---------------------------------------------------------------------------------------------------


class NaiveAntTokenizer:
    def __init__(self, vocab_path):
        self.encoder = {}
        with open(vocab_path, encoding="utf-8") as f:
            for line in f.readlines():
                token = line.strip()
                if token:
                    self.encoder[token] = len(self.encoder)
        self.encoder[" "] = self.encoder.pop("</_>")
        self.encoder["\n"] = self.encoder.pop("</n>")

    def wordpiece(self, piece: str) -> list[str]:
        if len(piece) > 200:
            return ["<unk>"]
        out, start = [], 0
        while start < len(piece):
            end, found = len(piece), None
            while start < end:
                if piece[start:end] in self.encoder:
                    found = piece[start:end]
                    break
                end -= 1
            if found is None:
                out.append("<unk>")
                start += 1
            else:
                out.append(found)
                start = end
        return out

    def encode(self, text: str) -> list[int]:
        return [self.encoder[t] for piece in jieba.cut(text, cut_all=False) for t in self.wordpiece(piece)]


TEXTS = [
    "今天天气不错，我们去公园散步吧。",
    "中华人民共和国成立于1949年10月1日，首都是北京。",
    "CPM-Ant is a 10B Chinese language model trained by OpenBMB in 2022.",
    "Hello, world!  Two spaces,\ttab, and   three spaces.",
    "第一行\n第二行\n\n空行之后\r\nWindows 换行",
    "数字：3.1415926535，电话 010-12345678，百分比 99.9%，价格 ¥1,299.00",
    "表情😀🎉👍，还有㊗️和🀄，以及罕见字：𠀀𪚥龘靐。",
    "   leading and trailing spaces   ",
    "\n\n\n",
    " ",
    "全角\u3000空格、零宽\u200b字符、组合字符 é 和 ﬁ 连字。",
    "<s>特殊记号</s><pad><unk> 在文本里 </n> </_>",
    "a" * 200,
    "a" * 201,
    "1" * 250 + "以及后面的中文",
    "中华人民共和国" * 40,
    "混合English和中文mixed的句子，包括URL https://www.example.com/path?q=1&r=2 以及 email: a.b@c.org",
    "《红楼梦》是中国古典四大名著之一，作者曹雪芹。“满纸荒唐言，一把辛酸泪！”",
    "Ελληνικά, русский, العربية, हिन्दी, 日本語のひらがな、한국어",
    "C++与C#、.NET以及100%的A-B测试_v2.0，价格+税&运费#1",
    "今天天气不错，今天天气不错，今天天气不错。",
    "",
]


def _fuzz_texts(tokenizer: CPMAntTokenizer, n: int, seed: int = 0) -> list[str]:
    """Random mixtures of vocabulary tokens, whitespace, digits and characters outside the vocabulary."""
    rng = random.Random(seed)
    tokens = [t for t in tokenizer.id_to_token[10:] if not t.startswith("<")]
    extras = [" ", "  ", "\n", "\t", "😀", "𠀀", "é", "。", "，", "123", "abc", "\u3000", "+", "#", "&", ".", "_", "%", "-", "\r\n"]
    return ["".join(rng.choice(tokens if rng.random() < 0.8 else extras) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def test_ant_vocab_matches_the_original_algorithm(ant_vocab):
    ours, naive = CPMAntTokenizer(ant_vocab), NaiveAntTokenizer(ant_vocab)
    assert ours.vocab_size == len(naive.encoder) == 30720
    for text in TEXTS + _fuzz_texts(ours, 300):
        assert ours.encode(text) == naive.encode(text), repr(text[:80])
    # Memoised pieces give the same ids the second time round.
    assert [ours.encode(t) for t in TEXTS] == [naive.encode(t) for t in TEXTS]


def test_ant_vocab_known_ids(ant_vocab):
    tok = CPMAntTokenizer(ant_vocab)
    assert tok.id_to_token[:10] == ["<pad>", "<unk>", "<mask>", "<sep>", "</n>", "</_>", "<s>", "</s>", "<d>", "</d>"]
    assert tok.id_to_token[30653] == "<s0>" and tok.id_to_token[30711] == "<s58>"
    assert tok.encode(" \n") == [SPACE, NEWLINE]
    assert tok.encode("a" * 201) == [UNK]
    assert UNK not in tok.encode_for_model("表情😀")


def test_tiny_vocab_matches_the_original_algorithm(tiny_vocab):
    ours, naive = CPMAntTokenizer(tiny_vocab), NaiveAntTokenizer(tiny_vocab)
    for text in TEXTS + _fuzz_texts(ours, 200, seed=1):
        assert ours.encode(text) == naive.encode(text), repr(text[:80])


def test_decode_and_special_ids(tiny_vocab):
    tok = CPMAntTokenizer(tiny_vocab)
    text = "今天天气不错，\n hello world"
    ids = tok.encode(text)
    assert UNK not in ids and tok.decode(ids) == text
    assert tok.decode([BOS] + ids + [EOS, PAD]) == text
    assert tok.decode([BOS, EOS], skip_special=False) == "<s></s>"
    assert tok.encode("今天\n")[-1] == NEWLINE and tok.tokenize("a b")[1] == "</_>"
    assert tok.encode("今天😀") == [tok.token_to_id["今天"], UNK]
    assert tok.encode_for_model("今天😀") == [tok.token_to_id["今天"]]


def test_bad_vocab_files(tmp_path):
    with pytest.raises(CpmctlError, match="vocab file not found"):
        CPMAntTokenizer(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("hello\nworld\n", encoding="utf-8")
    with pytest.raises(CpmctlError, match="not a CPM-Ant vocabulary"):
        CPMAntTokenizer(bad)
    specials = "<pad>\n<unk>\n<mask>\n<sep>\n</n>\n</_>\n<s>\n</s>\n<d>\n</d>\n"
    # Lines the original's line.strip() would change or skip: refused, since every later id would shift.
    for body, message in [("a\n\nb\n", ":12: empty token"), ("a\nb \n", ":12: empty token or token with surrounding"),
                          ("a\nb\na\n", ":13: duplicate token 'a'")]:
        bad.write_text(specials + body, encoding="utf-8")
        with pytest.raises(CpmctlError, match=message):
            CPMAntTokenizer(bad)
    bad.write_bytes((specials + "a\nb\n").replace("\n", "\r\n").encode())  # read as text, like the original
    assert CPMAntTokenizer(bad).id_to_token[10:] == ["a", "b"]
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CpmctlError, match="not UTF-8"):
        CPMAntTokenizer(binary)
