"""`data vocab`: the original's layout, learnt from jieba segments of a corpus."""

from __future__ import annotations

import json
from pathlib import Path

import jieba
import pytest
from collections import Counter

from cpmctl import CpmctlError
from cpmctl.data.textio import resolve_inputs
from cpmctl.data.vocab import ASCII_PRINTABLE, TAIL_TOKENS, build_vocab
from cpmctl.model.tokenizer import SPECIAL_TOKENS, CPMAntTokenizer

CORPUS = [
    "今天天气不错，我们一起去公园散步。",
    "北京是中国的首都，我们都爱北京。",
    "我们今天学习了机器学习和深度学习。",
    "深度学习模型需要大量的数据进行训练。",
]


def corpus(tmp_path: Path, n: int = 5) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS * n) + "\n", encoding="utf-8")
    return path


def test_layout_and_tokenizer_round_trip(tmp_path):
    out = tmp_path / "vocab.txt"
    r = build_vocab(resolve_inputs([corpus(tmp_path)]), out, size=225)
    tokens = out.read_text(encoding="utf-8").split("\n")[:-1]
    assert len(tokens) == r.size == 225
    assert tokens[:10] == SPECIAL_TOKENS
    assert tokens[-len(TAIL_TOKENS):] == TAIL_TOKENS and r.tail
    chars = tokens[10 : 10 + r.characters]
    assert chars == sorted(chars) and set(ASCII_PRINTABLE) <= set(chars)
    assert set("".join(CORPUS)) - {"\n"} <= set(chars)  # every character seen
    words = tokens[10 + r.characters : -len(TAIL_TOKENS)]
    counts = Counter(w for text in CORPUS for w in jieba.cut(text) if len(w) > 1)
    assert words == sorted(counts, key=lambda w: (-counts[w], w))[: len(words)] and len(words) == 225 - 10 - 139 - 67
    tok = CPMAntTokenizer(out)
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == text and 1 not in tok.encode(text)  # no <unk>
    assert tok.encode("我们")[0] == tokens.index("我们")


def test_tail_is_left_out_when_the_size_has_no_room(tmp_path, capsys):
    out = tmp_path / "v.txt"
    warnings = []
    r = build_vocab(resolve_inputs([corpus(tmp_path)]), out, size=170, warn=warnings.append)
    assert not r.tail and r.size <= 170
    assert "<s0>" not in out.read_text(encoding="utf-8")
    with pytest.raises(CpmctlError, match="too small"):
        build_vocab(resolve_inputs([corpus(tmp_path)]), out, size=50)


def test_tail_matches_the_original(ant_vocab):
    tokens = ant_vocab.read_text(encoding="utf-8").splitlines()
    assert tokens[-len(TAIL_TOKENS):] == TAIL_TOKENS
    assert tokens.index("<s0>") == 30653 and tokens[:10] == SPECIAL_TOKENS


def test_vocab_command(tmp_path, capsys):
    from cpmctl.cli.app import main

    src = corpus(tmp_path, 3)
    out = tmp_path / "v.txt"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["data", "vocab", "--input", str(src), "--out", str(out), "--size", "300", "--json", "-w", "2"])
    assert e.value.code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["size"] == len(out.read_text(encoding="utf-8").splitlines())
    assert summary["documents"] == 12
    with pytest.raises(SystemExit) as e:
        main(["data", "vocab", "--input", str(tmp_path / "missing.txt"), "--out", str(out)])
    assert e.value.code == 2 and "input not found" in capsys.readouterr().err
