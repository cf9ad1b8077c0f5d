"""`data pack` / `data inspect`: records as the original builds them, packing, round trip, splits, workers."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cpmctl import CpmctlError
from cpmctl.data.pack import PackSettings, objective_counts, inspect_splits, make_record, pack
from cpmctl.model.inputs import LM_TASK as LM
from cpmctl.model.inputs import MLM_TASK as MLM
from cpmctl.data.packed_format import PackedDataset, PackedReader
from cpmctl.model.inputs import IGNORE
from cpmctl.data.textio import resolve_inputs
from cpmctl.model.tokenizer import BOS, EOS, UNK, CPMAntTokenizer
from tests.conftest import run_cli

# Only characters of the tiny test vocabulary, so text -> tokens -> text is exact.
SENTENCES = ["今天天气不错，我们去上海。", "中国的经济发展很好。", "老师和学生在学校研究科学技术。",
             "北京的春天有风，夏天有雨。", "我们研究语言模型的训练数据。", "世界文化历史问题很多。"]


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["\n".join("".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4)))
            for _ in range(n)]


def write_corpus(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def records_of(dataset: PackedDataset):
    """Every record of every row as (task, input ids, target, context, segment)."""
    for row in range(len(dataset)):
        r = dataset.rows(row)
        for span in np.unique(r["span"]):
            sel = r["span"] == span
            if r["task"][sel][0] < 0:
                continue
            yield int(r["task"][sel][0]), r["input"][sel], r["target"][sel], r["context"][sel], r["segment"][sel]


def test_lm_and_mlm_records_follow_the_original(tiny_vocab):
    V = CPMAntTokenizer(tiny_vocab).vocab_size
    piece = list(range(20, 120))
    rng = random.Random(3)
    lm = make_record(piece, LM, rng, V)
    assert list(lm.input[:32]) == [V + 64 + j for j in range(32)]
    assert lm.input[32] == BOS and list(lm.input[33:-1]) == piece and lm.input[-1] == EOS
    assert list(lm.segment) == [0] * 32 + [2] * 102
    ctx = lm.context.astype(bool)
    split = int(np.argmin(ctx))
    assert ctx[: split].all() and not ctx[split:].any() and 33 <= split < len(ctx)  # a suffix is predicted
    mlm = make_record(piece, MLM, rng, V, 0.15)
    assert list(mlm.input[:32]) == [V + 32 + j for j in range(32)] and list(mlm.input[33:-1]) == piece  # not replaced
    assert list(mlm.segment) == [0] * 32 + [1] * 102
    masked = np.flatnonzero(mlm.context == 0)
    assert len(masked) == 15 and masked.min() > 32  # mask_ratio: a fixed share; <s> always given
    for rec in (lm, mlm, make_record(piece, MLM, rng, V), make_record(piece, LM, rng, V)):
        for i in range(len(rec.input)):
            want = rec.input[i + 1] if i + 1 < len(rec.input) and rec.context[i + 1] == 0 else IGNORE
            assert rec.target[i] == want


def test_predicted_counts_follow_the_original_distribution(tiny_vocab):
    """The original (training_tasks/ant/pretrain.py), recomputed here from its rules: for a record of n tokens
    (<s> + piece + </s>) mlm predicts k = randint(1, n - 1) positions drawn from 1..n - 1 and lm a suffix of
    randint(1, n - 1) tokens. So both predict (n / 2) / n of the tokens on average, at least 1, never <s>; an
    mlm record predicts </s> with probability E[k] / (n - 1) = 1/2, and an lm record always does."""
    V = CPMAntTokenizer(tiny_vocab).vocab_size
    rng = random.Random(11)
    stats = {LM: [], MLM: []}
    eos_predicted = []
    for i in range(4000):
        piece = list(range(20, 20 + 32 + i % 67))  # pieces of 32..98 tokens
        task = LM if i % 2 else MLM
        rec = make_record(piece, task, rng, V)
        predicted = rec.context[32:] == 0  # over <s> + piece + </s>
        n = len(piece) + 2
        assert not predicted[0] and 1 <= predicted.sum() <= n - 1
        if task == LM:
            k = int(predicted.sum())
            assert predicted[n - k :].all() and not predicted[: n - k].any()  # a suffix, </s> included
        else:
            eos_predicted.append(bool(predicted[-1]))
        stats[task].append(predicted.sum() / n)
    # E[k / n] = (n / 2) / n = 0.5 exactly for k uniform on 1..n - 1; 2000 draws: standard error ~0.006.
    for task in (LM, MLM):
        assert abs(np.mean(stats[task]) - 0.5) < 0.025, task
    assert abs(np.mean(eos_predicted) - 0.5) < 0.04


def test_later_prompts_quirk_reads_later_records_prompts_as_words(tiny_vocab, tmp_path):
    """--later-prompts input-embedding: the original's model looks up only a row's first 32 positions in the
    prompt embedding, so a later record's prompt ids (32 * task + j) are vocabulary ids 32..95."""
    V = CPMAntTokenizer(tiny_vocab).vocab_size
    src = write_corpus(tmp_path / "in.jsonl", documents(40, seed=3))
    for mode in ("prompt-embedding", "input-embedding"):
        pack(resolve_inputs([src]), tiny_vocab, tmp_path / mode, PackSettings(max_length=256, seed=0, later_prompts=mode))
    ours, quirk = PackedDataset(tmp_path / "prompt-embedding" / "train"), PackedDataset(tmp_path / "input-embedding" / "train")
    later = 0
    for row in range(len(ours)):
        a, b = ours.rows(row), quirk.rows(row)
        for key in ("target", "segment", "context", "span", "task"):
            assert (a[key] == b[key]).all()
        for span in np.unique(a["span"]):
            sel = np.flatnonzero(a["span"] == span)
            if a["task"][sel[0]] < 0:
                continue
            slots = sel[:32]
            assert (a["input"][slots] >= V).all()
            if sel[0] == 0:
                assert (b["input"][slots] == a["input"][slots]).all()  # the row's first record: prompt embedding
            else:
                later += 1
                task = int(a["task"][sel[0]])
                assert b["input"][slots].tolist() == [32 * task + j for j in range(32)]
            assert (b["input"][sel[32:]] == a["input"][sel[32:]]).all()
    assert later > 0


def test_round_trip_decoded_records_are_the_source_pieces(tiny_vocab, tmp_path):
    tok = CPMAntTokenizer(tiny_vocab)
    texts = documents(40)
    src = write_corpus(tmp_path / "in.jsonl", texts)
    settings = PackSettings(max_length=96, seed=1)
    result = pack(resolve_inputs([src]), tiny_vocab, tmp_path / "out", settings)
    step = settings.piece_length
    expected = Counter()
    for t in texts:
        ids = tok.encode_for_model(t)
        assert UNK not in tok.encode(t) and tok.decode(ids) == t
        expected.update(tok.decode(ids[i : i + step]) for i in range(0, len(ids), step) if len(ids[i : i + step]) >= 32)
    dataset = PackedDataset(tmp_path / "out" / "train")
    got = Counter(tok.decode(ids[33:-1].tolist()) for _, ids, *_ in records_of(dataset))
    assert got == expected and sum(got.values()) == result.splits["train"]["records"] > 40
    # A document whose only piece is under 32 tokens gives no record.
    assert result.short_documents == sum(len(tok.encode_for_model(t)) < 32 for t in texts)


def test_rows_pack_records_in_distinct_spans_with_padding(tiny_vocab, tmp_path):
    src = write_corpus(tmp_path / "in.jsonl", documents(60, seed=2))
    result = pack(resolve_inputs([src]), tiny_vocab, tmp_path / "out", PackSettings(max_length=128, seed=0))
    ds = PackedDataset(tmp_path / "out" / "train")
    assert ds.meta["records_per_task"] == result.splits["train"]["records_per_task"]
    assert ds.meta["vocab_md5"] and ds.meta["seed"] == 0 and ds.meta["sources"] == [str(src)]
    tasks = Counter()
    for row in range(len(ds)):
        r = ds.rows(row)
        pad = r["task"] == -1
        assert (r["input"][pad] == 0).all() and (r["context"][pad] == 0).all() and (r["target"][pad] == IGNORE).all()
        if pad.any():
            assert pad[np.argmax(pad):].all()  # padding only at the end, in a span no record uses
            assert not set(r["span"][pad]) & set(r["span"][~pad])
        spans = r["span"][~pad]
        starts = np.flatnonzero(np.diff(spans, prepend=-1))
        assert len(set(spans)) == len(starts)  # each record one contiguous, distinct span
        for s in starts:
            tasks[int(r["task"][s])] += 1
            assert r["input"][s] >= ds.vocab_size and r["segment"][s] == 0  # a record starts with its prompt
    assert tasks[1] > 0 and tasks[2] > 0 and abs(tasks[1] - tasks[2]) < 0.5 * sum(tasks.values())
    assert result.splits["train"]["fill"] > 0.5


def test_valid_split_workers_and_seed(tiny_vocab, tmp_path):
    src = write_corpus(tmp_path / "in.jsonl", documents(120, seed=3))
    shards = resolve_inputs([src])
    s = PackSettings(max_length=96, seed=5, valid_fraction=0.25)
    a = pack(shards, tiny_vocab, tmp_path / "a", s, chunk_bytes=2000)
    pack(shards, tiny_vocab, tmp_path / "b", s, workers=2, chunk_bytes=2000)
    assert 0 < a.splits["valid"]["records"] < a.splits["train"]["records"]
    for split in ("train", "valid"):
        for name in ("input", "target", "context", "segment", "span", "task"):
            assert (tmp_path / "a" / split / f"{name}.bin").read_bytes() == (tmp_path / "b" / split / f"{name}.bin").read_bytes()
    c = pack(shards, tiny_vocab, tmp_path / "c", PackSettings(max_length=96, seed=6, valid_fraction=0.25))
    assert (tmp_path / "c" / "train" / "context.bin").read_bytes() != (tmp_path / "a" / "train" / "context.bin").read_bytes()
    assert c.documents == a.documents == 120


def test_reader_over_packed_output_resumes_exactly(tiny_vocab, tmp_path):
    src = write_corpus(tmp_path / "in.jsonl", documents(80, seed=4))
    pack(resolve_inputs([src]), tiny_vocab, tmp_path / "out", PackSettings(max_length=96))
    ds = PackedDataset(tmp_path / "out" / "train")
    reader = PackedReader(ds, batch_size=2, seed=9)
    reader.next_rows()
    state = reader.state_dict()
    expected = reader.next_rows()["input"]
    again = PackedReader(ds, batch_size=2, seed=0)
    again.load_state_dict(state)
    assert (again.next_rows()["input"] == expected).all()


def test_inspect_and_pack_commands(tiny_vocab, tmp_path, capsys):
    def cli(*args):
        return run_cli(capsys, "data", *args)

    src = write_corpus(tmp_path / "in.jsonl", documents(30, seed=5))
    code, out, err = cli("pack", "-i", src, "--vocab", tiny_vocab, "--out", tmp_path / "p", "--max-length", "96",
                         "--valid-fraction", "0.2", "--json", "-w", "1")
    assert code == 0, err
    summary = json.loads(out)
    assert set(summary["splits"]) == {"train", "valid"} and (tmp_path / "p" / "vocab.txt").exists()
    code, out, err = cli("inspect", tmp_path / "p", "--json", "--rows", "1")
    assert code == 0, err
    splits = [json.loads(line) for line in out.splitlines()]
    assert [s["split"] for s in splits] == ["train", "valid"]
    assert splits[0]["records"] == summary["splits"]["train"]["records"]
    assert splits[0]["samples"] and "⟦" in splits[0]["samples"][0]["text"]
    # Per objective: records, tokens and predicted tokens, as written at pack time and as recounted from the rows.
    for split in splits:
        ds = PackedDataset(split["path"])
        want = {name: {"records": 0, "tokens": 0, "predicted": 0} for name in ("mlm", "lm")}
        for task, ids, _, context, _ in records_of(ds):
            counts = want["lm" if task == LM else "mlm"]
            counts["records"] += 1
            counts["tokens"] += len(ids)
            counts["predicted"] += int((context == 0).sum())
        assert split["objectives"] == want
        assert objective_counts(ds)[0] == want
    code, out, _ = cli("inspect", tmp_path / "p" / "train")
    assert code == 0 and "fill" in out and "row 0" in out
    code, _, err = cli("pack", "-i", src, "--vocab", tmp_path / "nope.txt", "--out", tmp_path / "q")
    assert code == 2 and "vocab file not found" in err
    code, _, err = cli("pack", "-i", src, "--vocab", tiny_vocab, "--out", tmp_path / "q", "--max-length", "40")
    assert code == 2 and "--max-length must be at least 66" in err
    code, _, err = cli("inspect", tmp_path)
    assert code == 2 and "not a packed dataset" in err
    with pytest.raises(CpmctlError, match="packed with another vocabulary"):
        other = tmp_path / "other_vocab.txt"
        other.write_text(tiny_vocab.read_text(encoding="utf-8").replace("hello", "hallo"), encoding="utf-8")
        inspect_splits(tmp_path / "p", other)
