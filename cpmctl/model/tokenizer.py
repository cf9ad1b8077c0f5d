"""The CPM-Ant tokenizer: jieba (HMM on) pieces, then greedy longest-prefix match against the vocabulary.

Bit-exact with the original on ant.txt (shared/reference/cpm-ant.md section 5). Speed comes from things that do
not change the result: jieba.cut splits a text into blocks (runs of its "Han" characters, and the rest) and segments
each block on its own, so the ids of a block are memoised (text repeats its clauses, names and numbers, and jieba's
segmentation is the expensive part); within a block, the ids of a jieba piece are memoised; and the longest-match
search starts at the longest token length in the vocabulary.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from cpmctl import CpmctlError

PAD, UNK, MASK, SEP, NEWLINE, SPACE, BOS, EOS = 0, 1, 2, 3, 4, 5, 6, 7
SPECIAL_TOKENS = ["<pad>", "<unk>", "<mask>", "<sep>", "</n>", "</_>", "<s>", "</s>", "<d>", "</d>"]
MAX_PIECE_CHARS = 200


def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


class CPMAntTokenizer:
    def __init__(self, vocab_path: str | Path):
        self.path = Path(vocab_path)
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CpmctlError(f"vocab file not found: {self.path}") from None
        except UnicodeDecodeError as e:
            raise CpmctlError(f"{self.path}: vocab is not UTF-8 ({e})") from None
        tokens = text.split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        if tokens[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise CpmctlError(
                f"{self.path}: not a CPM-Ant vocabulary (the first {len(SPECIAL_TOKENS)} lines must be "
                f"{' '.join(SPECIAL_TOKENS)})"
            )
        # The original reads the file with line.strip() and skips empty lines: a token that those would change
        # shifts every later id, and a duplicate takes another's id. Refuse such a file instead of diverging.
        seen: set[str] = set()
        for line, tok in enumerate(tokens, 1):
            if not tok or tok != tok.strip():
                raise CpmctlError(f"{self.path}:{line}: empty token or token with surrounding whitespace {tok!r}")
            if tok in seen:
                raise CpmctlError(f"{self.path}:{line}: duplicate token {tok!r}")
            seen.add(tok)
        self.id_to_token = tokens
        # The space and newline tokens are matched by the characters they stand for.
        self.token_to_id = {tok: i for i, tok in enumerate(tokens)}
        del self.token_to_id["</_>"], self.token_to_id["</n>"]
        self.token_to_id[" "] = SPACE
        self.token_to_id["\n"] = NEWLINE
        self.max_token_chars = max(len(t) for t in self.token_to_id)
        self._decode_table = list(tokens)
        self._decode_table[SPACE], self._decode_table[NEWLINE] = " ", "\n"
        self._piece_ids = lru_cache(maxsize=1 << 18)(self._match)
        self._block_ids = lru_cache(maxsize=1 << 18)(self._encode_block)
        self._jieba = _jieba()

    def __len__(self) -> int:
        return len(self.id_to_token)

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    pad_id, unk_id, mask_id, sep_id, newline_id, space_id, bos_id, eos_id = PAD, UNK, MASK, SEP, NEWLINE, SPACE, BOS, EOS

    def _match(self, piece: str) -> tuple[int, ...]:
        """Greedy longest-prefix match of one jieba piece; an unmatched character becomes <unk>."""
        if len(piece) > MAX_PIECE_CHARS:
            return (UNK,)
        vocab, ids, start, n = self.token_to_id, [], 0, len(piece)
        while start < n:
            end = min(n, start + self.max_token_chars)
            while end > start and piece[start:end] not in vocab:
                end -= 1
            if end == start:
                ids.append(UNK)
                start += 1
            else:
                ids.append(vocab[piece[start:end]])
                start = end
        return tuple(ids)

    def pieces(self, text: str) -> list[str]:
        return list(self._jieba.cut(text, cut_all=False, HMM=True))

    def _encode_block(self, block: str) -> tuple[int, ...]:
        ids: list[int] = []
        for piece in self._jieba.cut(block, cut_all=False, HMM=True):
            ids.extend(self._piece_ids(piece))
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        """Token ids, <unk> included (model inputs drop it: see `encode_for_model`)."""
        ids: list[int] = []
        # jieba.cut's own first split (same regex): each block is segmented independently of its neighbours.
        for block in self._jieba.re_han_default.split(text):
            if block:
                ids.extend(self._block_ids(block))
        return ids

    def encode_for_model(self, text: str) -> list[int]:
        return [i for i in self.encode(text) if i != UNK]

    def tokenize(self, text: str) -> list[str]:
        return [self.id_to_token[i] for i in self.encode(text)]

    def decode(self, ids, skip_special: bool = True) -> str:
        table = self._decode_table
        skip = {PAD, BOS, EOS} if skip_special else set()
        return "".join(table[i] for i in ids if 0 <= i < len(table) and i not in skip)
