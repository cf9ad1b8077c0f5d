"""`cpmctl eval ppl` and `eval compare`: perplexity equals exp(mean loss) computed directly with the model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import run_cli, tiny_config
from cpmctl.data.packed_format import PackedDataset, PackedWriter
from cpmctl.model.inputs import IGNORE
from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import load_model, save_native
from cpmctl.model.tokenizer import BOS, CPMAntTokenizer
from cpmctl.tasks import get_task

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
TASK_VOCAB = FIXTURES / "vocab.txt"


def run(capsys, *argv) -> tuple[int, str, str]:
    return run_cli(capsys, *argv)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Two tiny checkpoints (2 and 1 layers), raw documents, and a packed dataset."""
    root = tmp_path_factory.mktemp("ppl")
    tok = CPMAntTokenizer(TASK_VOCAB)
    save_native(build_model(tiny_config(tok.vocab_size), seed=0), root / "big", vocab=TASK_VOCAB)
    save_native(build_model(tiny_config(tok.vocab_size, num_layers=1), seed=1), root / "small", vocab=TASK_VOCAB)
    texts = [json.loads(line)["input"] for line in (FIXTURES / "lcsts" / "train.jsonl").read_text().splitlines()]
    texts.append("今天天气不错。" * 40)  # longer than one window at --max-length 64
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    task = get_task("kdconv")
    rows = task.to_rows(task.load_split(FIXTURES / "kdconv", "train"), tok, max_length=128, pack=True)
    writer = PackedWriter(root / "packed", max_length=128, vocab_size=tok.vocab_size)
    for row in rows:
        writer.add_row(**row)
    writer.close()
    return root


def direct_document_nll(model, tok, texts: list[str], window: int) -> tuple[float, int]:
    """One document window at a time, no batching or padding: prompt + <s> given, text tokens predicted."""
    v, p = model.config.vocab_size, model.config.prompt_length
    nll, count = 0.0, 0
    for text in texts:
        ids = tok.encode_for_model(text)
        for start in range(0, len(ids), window):
            piece = ids[start : start + window]
            seq = [v + p * 2 + j for j in range(p)] + [BOS] + piece
            n = len(seq)
            inp = torch.tensor([seq])
            seg = torch.tensor([[0] * p + [2] * (n - p)])
            ctx = torch.tensor([[True] * (p + 1) + [False] * len(piece)])
            with torch.no_grad():
                logp = F.log_softmax(model(inp, seg, ctx).float(), dim=-1)[0]
            nll -= sum(logp[p + i, t].item() for i, t in enumerate(piece))
            count += len(piece)
    return nll, count


def test_ppl_on_raw_text_equals_direct_exp_mean_loss(capsys, workdir):
    code, out, err = run(capsys, "eval", "ppl", "--model", workdir / "big", "--data", workdir / "docs.jsonl",
                         "--max-length", "64", "--batch-size", "3", "--device", "cpu", "--json")
    assert code == 0, err
    result = json.loads(out)
    model, _ = load_model(workdir / "big")
    tok = CPMAntTokenizer(TASK_VOCAB)
    texts = [json.loads(line)["text"] for line in (workdir / "docs.jsonl").read_text().splitlines()]
    nll, count = direct_document_nll(model, tok, texts, window=64 - 33)
    assert result["source"] == "raw" and result["tokens"] == count
    assert result["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert result["bpc"] == pytest.approx(nll / math.log(2) / sum(len(t) for t in texts), rel=1e-4)


def test_ppl_on_packed_data_equals_direct_exp_mean_loss(capsys, workdir):
    code, out, err = run(capsys, "eval", "ppl", "--model", workdir / "big", "--data", workdir / "packed",
                         "--batch-size", "2", "--device", "cpu", "--json")
    assert code == 0, err
    result = json.loads(out)
    model, _ = load_model(workdir / "big")
    data = PackedDataset(workdir / "packed")
    losses = []
    for i in range(len(data)):  # row by row, full logits
        r = {k: torch.from_numpy(np.asarray(a[i : i + 1]).astype(np.int64)) for k, a in data.arrays.items()}
        with torch.no_grad():
            logits = model(r["input"], r["segment"], r["context"].bool(), r["span"]).float()
        mask = r["target"] != IGNORE
        losses.append(F.cross_entropy(logits[mask], r["target"][mask], reduction="none"))
    losses = torch.cat(losses)
    assert result["source"] == "packed" and result["tokens"] == losses.numel()
    assert result["loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(losses.mean().item()), rel=1e-4)
    assert result["bpc"] is not None and result["bpc"] > 0


def test_compare_writes_table_markdown_and_chart(capsys, workdir, tmp_path):
    code, out, err = run(capsys, "eval", "compare", "--models", workdir / "big", workdir / "small", "--data",
                         workdir / "docs.jsonl", "--out", tmp_path / "cmp", "--max-length", "64", "--device", "cpu",
                         "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["model"] for r in rows] == ["big", "small"]
    assert rows[0]["relative"] == 100.0
    assert rows[1]["relative"] == pytest.approx(100.0 * rows[0]["loss"] / rows[1]["loss"])
    assert rows[0]["params_non_embedding"] > rows[1]["params_non_embedding"]
    # The same loss `eval ppl` reports for that model.
    code, out, _ = run(capsys, "eval", "ppl", "--model", workdir / "small", "--data", workdir / "docs.jsonl",
                       "--max-length", "64", "--device", "cpu", "--json")
    assert json.loads(out)["loss"] == pytest.approx(rows[1]["loss"], rel=1e-6)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| big |" in md and "| small |" in md and "100.0%" in md
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"] == rows


def test_ppl_and_compare_bad_input(capsys, workdir, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "好"}\n{"txt": 1}\n')
    cases = [
        (["eval", "ppl", "--model", workdir / "big", "--data", tmp_path / "missing.jsonl"], "data not found"),
        (["eval", "ppl", "--model", workdir / "big", "--data", tmp_path / "bad.jsonl"], "bad.jsonl:2: no string field 'text'"),
        (["eval", "compare", "--models", workdir / "big", "--data", workdir / "docs.jsonl"], "at least two checkpoints"),
        (["eval", "compare", "--models", workdir / "big", workdir / "small", "--names", "a", "--data",
          workdir / "docs.jsonl"], "--names gives 1 labels for 2 models"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err, (argv, err)
