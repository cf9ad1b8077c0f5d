"""`data vocab`: learn a CPM-Ant vocabulary from a corpus, in the original's format and special-token layout.

Layout (the original ant.txt; shared/reference/cpm-ant.md section 5): ids 0-9 are the special tokens; then every
character seen in the corpus (printable ASCII always included, whitespace excluded: space and newline are tokens
5 and 4), sorted by code point; then the most frequent multi-character jieba words (frequency, then code point);
then the tail of the original, `<s0>`..`<s58>` and `##`..`#########`, when the size leaves room for it. One token
per line, UTF-8. The result loads with CPMAntTokenizer.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cpmctl import CpmctlError
from cpmctl.data.parallel import ordered_map
from cpmctl.data.textio import DEFAULT_CHUNK_BYTES, Block, LineErrors, MalformedLine, Shard, check_readable, parse_line, read_blocks
from cpmctl.outputs import claim
from cpmctl.model.tokenizer import MAX_PIECE_CHARS, SPECIAL_TOKENS

TAIL_TOKENS = [f"<s{i}>" for i in range(59)] + ["#" * n for n in range(2, 10)]
ASCII_PRINTABLE = [chr(c) for c in range(33, 127)]
MAX_WORD_CHARS = 16  # longer jieba pieces are rarely reusable words (URLs, numbers)
PRUNE_AT = 4_000_000  # distinct words held before the rarest are forgotten (bounds memory on huge corpora)


@dataclass
class VocabResult:
    path: str
    size: int
    requested: int
    characters: int
    words: int
    tail: bool
    documents: int
    malformed: int
    bytes: int
    seconds: float
    md5: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


_fmt = "jsonl"


def _init_worker(fmt: str) -> None:
    global _fmt
    import jieba
    import logging

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    _fmt = fmt


def count_chunk(block: Block) -> tuple[Counter, Counter, int, list]:
    """(character counts, word counts, documents, malformed (offset, reason)) of a block of lines."""
    import jieba

    chars: Counter = Counter()
    words: Counter = Counter()
    docs, malformed = 0, []
    for i, line in enumerate(block.split()):
        try:
            parsed = parse_line(line, _fmt)
        except MalformedLine as e:
            malformed.append((i, str(e)))
            continue
        if parsed is None:
            continue
        docs += 1
        text = parsed[0]
        chars.update(text)
        for piece in jieba.cut(text, cut_all=False, HMM=True):
            if 1 < len(piece) <= MAX_WORD_CHARS and not piece.isspace():
                words[piece] += 1
    return chars, words, docs, malformed


def _usable_char(ch: str) -> bool:
    return not ch.isspace() and ch.isprintable()


def _usable_word(word: str, reserved: set[str]) -> bool:
    return len(word) <= MAX_PIECE_CHARS and word not in reserved and all(_usable_char(c) for c in word)


def build_vocab(
    shards: list[Shard],
    out: str | Path,
    size: int = 30720,
    min_char_count: int = 1,
    workers: int = 1,
    strict: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_progress: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    force: bool = False,
) -> VocabResult:
    """`out` follows the output policy (cpmctl/outputs.py), checked before any work."""
    if size < len(SPECIAL_TOKENS) + len(ASCII_PRINTABLE):
        raise CpmctlError(f"--size {size} is too small: the special tokens and printable ASCII alone take "
                          f"{len(SPECIAL_TOKENS) + len(ASCII_PRINTABLE)}")
    output = claim(out, "data vocab", kind="file", force=force, inputs=[s.path for s in shards])
    check_readable(shards)
    start = time.perf_counter()
    errors = LineErrors(strict, warn)
    chars: Counter = Counter()
    words: Counter = Counter()
    docs = nbytes = 0
    blocks = (block for index, shard in enumerate(shards) for block in read_blocks(shard, index, chunk_bytes))
    for block, (c, w, d, bad) in ordered_map(count_chunk, blocks, workers, _init_worker, (shards[0].format,)):
        for offset, reason in bad:
            errors(shards[block.shard].path, block.first + offset, reason)
        chars.update(c)
        words.update(w)
        docs += d
        nbytes += len(block.data)
        if on_progress:
            on_progress(len(block.data))
        if len(words) > PRUNE_AT:
            words = Counter({k: v for k, v in words.items() if v > 1})
    if docs == 0:
        raise CpmctlError("no documents in the input: cannot learn a vocabulary")

    reserved = set(SPECIAL_TOKENS) | set(TAIL_TOKENS)
    char_tokens = sorted({c for c, n in chars.items() if n >= min_char_count and _usable_char(c)} | set(ASCII_PRINTABLE))
    char_tokens = [c for c in char_tokens if c not in reserved]
    room = size - len(SPECIAL_TOKENS) - len(char_tokens)
    if room < 0:
        raise CpmctlError(f"--size {size} is too small for the {len(char_tokens)} distinct characters of the corpus "
                          f"(+{len(SPECIAL_TOKENS)} special tokens); raise --size or --min-char-count")
    tail = room >= len(TAIL_TOKENS)
    if tail:
        room -= len(TAIL_TOKENS)
    ranked = sorted((w for w in words if _usable_word(w, reserved)), key=lambda w: (-words[w], w))
    word_tokens = ranked[:room]
    tokens = list(SPECIAL_TOKENS) + char_tokens + word_tokens + (TAIL_TOKENS if tail else [])
    text = "\n".join(tokens) + "\n"
    with output.file("w", encoding="utf-8") as f:
        f.write(text)
    if len(tokens) < size and warn:
        warn(f"the corpus has only {len(word_tokens)} distinct words: the vocabulary has {len(tokens)} tokens, "
             f"not {size}")
    return VocabResult(str(out), len(tokens), size, len(char_tokens), len(word_tokens), tail, docs, errors.count,
                       nbytes, round(time.perf_counter() - start, 3), hashlib.md5(text.encode()).hexdigest())
