"""The CLI end to end: `model init|info|convert`, `data tokenize` and `generate`, their --json shapes, and one-line
errors with exit code 2 for bad input. Commands run in-process through `cpmctl.cli.app.main` (our exit codes), and
once as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cpmctl.cli.app import main
from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import NATIVE_WEIGHTS, save_native
from cpmctl.model.tokenizer import CPMAntTokenizer
from tests.conftest import REPO, tiny_config


def run(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def run_json(capsys, *argv) -> list[dict]:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def assert_bad_input(capsys, *argv, match: str):
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.fixture
def checkpoint(tmp_path, tiny_vocab, capsys):
    """`model init` of a tiny config file: a native checkpoint directory with its vocab."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config(1000).to_dict()))  # vocab_size follows the vocab file
    [result] = run_json(capsys, "model", "init", "--config", config, "--vocab", tiny_vocab, "--out", tmp_path / "ckpt", "--seed", "3")
    assert result["out"] == str(tmp_path / "ckpt") and result["seed"] == 3
    assert result["params_total"] == result["params_embedding"] + result["params_non_embedding"]
    return tmp_path / "ckpt"


def test_init_and_info(capsys, checkpoint, tiny_vocab):
    assert sorted(p.name for p in checkpoint.iterdir()) == [".cpmctl-output.json", "config.json", NATIVE_WEIGHTS,
                                                            "vocab.txt"]  # the marker: written by `model init`
    [info] = run_json(capsys, "model", "info", checkpoint)
    vocab_size = CPMAntTokenizer(tiny_vocab).vocab_size
    assert info["format"] == "native" and info["vocab_size"] == vocab_size and info["num_layers"] == 2
    assert info["params_total"] == sum(t.numel() for t in load_file(str(checkpoint / NATIVE_WEIGHTS)).values())

    [ladder] = run_json(capsys, "model", "info", "10b")
    assert ladder["format"] == "config" and ladder["ladder"] == "10b"
    assert round(ladder["params_non_embedding"] / 1e9, 3) == 9.261
    [pruned] = run_json(capsys, "model", "info", "cpm-ant-300m")
    assert (pruned["attention_layers_kept"], pruned["ffn_layers_kept"], pruned["num_heads"]) == (25, 21, 4)
    assert round(pruned["params_non_embedding"] / 1e9, 3) == 0.300

    code, out, _ = run(capsys, "model", "info", checkpoint)
    assert code == 0 and "params_total" in out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_convert_round_trip_is_bit_exact(capsys, tmp_path, tiny_vocab, dtype):
    save_native(build_model(tiny_config(CPMAntTokenizer(tiny_vocab).vocab_size), seed=1), tmp_path / "a", vocab=tiny_vocab, dtype=dtype)
    [to_orig] = run_json(capsys, "model", "convert", tmp_path / "a", "--to", "original", "--out", tmp_path / "o" / "m.pt")
    assert to_orig == {"source": str(tmp_path / "a"), "source_format": "native", "format": "original", "out": str(tmp_path / "o" / "m.pt"),
                       "output": str(tmp_path / "o" / "m.pt")}
    [info] = run_json(capsys, "model", "info", tmp_path / "o" / "m.pt")
    assert info["format"] == "original"
    [back] = run_json(capsys, "model", "convert", tmp_path / "o" / "m.pt", "--to", "native", "--out", tmp_path / "b")
    assert back["source_format"] == "original"
    a, b = load_file(str(tmp_path / "a" / NATIVE_WEIGHTS)), load_file(str(tmp_path / "b" / NATIVE_WEIGHTS))
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype == dtype and torch.equal(a[key], b[key]), key

    code, out, _ = run(capsys, "model", "convert", tmp_path / "b", "--to", "hf", "--out", tmp_path / "hf")
    assert code == 0 and "(hf)" in out
    [info] = run_json(capsys, "model", "info", tmp_path / "hf")
    assert info["format"] == "hf"


def test_tokenize(capsys, tiny_vocab, monkeypatch):
    [result] = run_json(capsys, "data", "tokenize", "今天天气不错 hello", "--vocab", tiny_vocab)
    tok = CPMAntTokenizer(tiny_vocab)
    assert result == {"text": "今天天气不错 hello", "ids": tok.encode("今天天气不错 hello"), "pieces": ["今天", "天气", "不错", "</_>", "hello"]}
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("中国\n"))
    [piped] = run_json(capsys, "data", "tokenize", "-", "--vocab", tiny_vocab)
    assert piped["ids"] == tok.encode("中国")  # the line's final newline is not part of the text
    code, out, _ = run(capsys, "data", "tokenize", "中国", "--vocab", tiny_vocab)
    assert code == 0 and out.splitlines()[0] == " ".join(map(str, tok.encode("中国")))


def test_generate_json_and_input_file(capsys, checkpoint, tmp_path):
    [one] = run_json(capsys, "generate", "今天天气", "--model", checkpoint, "--decode", "greedy", "--max-new-tokens", "5", "--device", "cpu")
    assert sorted(one) == ["prompt", "text", "token_ids"] and one["prompt"] == "今天天气"
    assert 0 < len(one["token_ids"]) <= 5 and all(isinstance(i, int) for i in one["token_ids"])

    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "今天天气"}, {"prompt": "我们的学校", "id": 7}, {"prompt": "hello world"}]
    prompts.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n", encoding="utf-8")
    results = run_json(capsys, "generate", "--input", prompts, "--model", checkpoint, "--decode", "greedy",
                       "--max-new-tokens", "5", "--batch-size", "2", "--device", "cpu")
    assert [r["prompt"] for r in results] == [x["prompt"] for x in lines]
    assert results[1]["id"] == 7 and "id" not in results[0]  # the input line's other fields are carried through
    assert results[0]["token_ids"] == one["token_ids"]  # batching does not change results

    beams = run_json(capsys, "generate", "--input", prompts, "--model", checkpoint, "--max-new-tokens", "4",
                     "--repetition-penalty", "1.2", "--device", "cpu")
    assert len(beams) == 3 and all(len(r["token_ids"]) <= 5 for r in beams)
    sampled = [run_json(capsys, "generate", "今天", "--model", checkpoint, "--decode", "sample", "--seed", "5",
                        "--max-new-tokens", "4", "--device", "cpu")[0] for _ in range(2)]
    assert sampled[0] == sampled[1]

    code, out, _ = run(capsys, "generate", "今天天气", "--model", checkpoint, "--decode", "greedy", "--max-new-tokens", "5", "--device", "cpu")
    assert code == 0 and out.rstrip("\n") == one["text"]


def test_generate_input_prints_progress_lines_on_a_piped_stderr(capsys, checkpoint, tmp_path, monkeypatch):
    from cpmctl import progress

    monkeypatch.setenv("CPMCTL_LOG_INTERVAL", "0")
    monkeypatch.setattr(progress, "plain_logs", lambda: True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in ["今天", "我们", "北京"]),
                       encoding="utf-8")
    code, out, err = run(capsys, "generate", "--input", prompts, "--model", checkpoint, "--decode", "greedy",
                         "--max-new-tokens", "2", "--batch-size", "1", "--device", "cpu", "--json")
    assert code == 0 and len(out.strip().splitlines()) == 3  # stdout stays the results alone
    lines = [line for line in err.splitlines() if line[:4].isdigit() and "generate" in line]
    assert [line.split()[2] for line in lines] == ["1/3", "2/3", "3/3"], err


def test_bad_input_is_one_line_and_exit_2(capsys, checkpoint, tmp_path, tiny_vocab, ant_vocab):
    gen = ("--decode", "greedy", "--max-new-tokens", "2", "--device", "cpu")
    assert_bad_input(capsys, "generate", "今天", "--model", tmp_path / "nowhere", *gen, match="checkpoint not found")
    assert_bad_input(capsys, "model", "info", tmp_path / "nowhere.json", match="nowhere.json")
    assert_bad_input(capsys, "model", "convert", checkpoint, "--to", "onnx", "--out", tmp_path / "x", match="unknown target format 'onnx'")
    assert_bad_input(capsys, "model", "init", "--config", "10b", "--vocab", tiny_vocab, "--out", tmp_path / "big", match="too large")
    assert_bad_input(capsys, "data", "tokenize", "", "--vocab", tiny_vocab, match="empty text")
    assert_bad_input(capsys, "data", "tokenize", "x", "--vocab", tmp_path / "none.txt", match="vocab file not found")

    # Empty prompt, and JSONL problems named by file and line.
    assert_bad_input(capsys, "generate", "   ", "--model", checkpoint, *gen, match="prompt 1 is empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": oops}\n', encoding="utf-8")
    assert_bad_input(capsys, "generate", "--input", bad, "--model", checkpoint, *gen, match=f"{bad}:2: not valid JSON")
    bad.write_text('{"prompt": "ok"}\n["a list"]\n', encoding="utf-8")
    assert_bad_input(capsys, "generate", "--input", bad, "--model", checkpoint, *gen, match=f"{bad}:2: expected an object")
    assert_bad_input(capsys, "generate", "--input", tmp_path / "missing.jsonl", "--model", checkpoint, *gen, match="input file not found")
    assert_bad_input(capsys, "generate", "--model", checkpoint, *gen, match="give a PROMPT or --input")

    # Vocab problems: none beside the checkpoint, or one of the wrong size.
    (checkpoint / "vocab.txt").rename(tmp_path / "moved.txt")
    assert_bad_input(capsys, "generate", "今天", "--model", checkpoint, *gen, match="no vocab.txt beside the checkpoint")
    assert_bad_input(capsys, "generate", "今天", "--model", checkpoint, "--vocab", ant_vocab, *gen,
                     match="vocab has 30720 tokens but the model expects")

    # Config / checkpoint mismatch: the message names the keys.
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    assert_bad_input(capsys, "generate", "今天", "--model", checkpoint, "--vocab", tmp_path / "moved.txt", *gen,
                     match="missing 9 keys (encoder.layers.2.")
    (checkpoint / "config.json").write_text(json.dumps({**config, "dim_ff": 50}))
    assert_bad_input(capsys, "model", "convert", checkpoint, "--to", "original", "--out", tmp_path / "o.pt",
                     match="mis-shaped 6 keys")
    assert not (tmp_path / "o.pt").exists()

    # A damaged weights file.
    (checkpoint / "config.json").write_text(json.dumps(config))
    weights = checkpoint / NATIVE_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:500])
    assert_bad_input(capsys, "generate", "今天", "--model", checkpoint, "--vocab", tmp_path / "moved.txt", *gen,
                     match="cannot read safetensors file")


def test_real_process_exit_codes(checkpoint):
    ok = subprocess.run(
        [sys.executable, "-m", "cpmctl", "generate", "今天", "--model", str(checkpoint), "--decode", "greedy",
         "--max-new-tokens", "3", "--device", "cpu", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert set(json.loads(ok.stdout)) == {"prompt", "text", "token_ids"}
    bad = subprocess.run(
        [sys.executable, "-m", "cpmctl", "generate", "今天", "--model", str(checkpoint / "nope"), "--device", "cpu"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: checkpoint not found")
