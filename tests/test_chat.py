"""`cpmctl chat`: the conversation template, the history kept within the context window, the commands, and the
command itself from a pipe (one message per line) and on a terminal."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from cpmctl import CpmctlError
from cpmctl.generate.decode import generate
from cpmctl.model.checkpoint import load_model
from cpmctl.model.generation_config import GenerationConfig
from cpmctl.model.tokenizer import CPMAntTokenizer
from cpmctl.serve import chat_template
from cpmctl.serve.chat import ChatSession, EndChat
from cpmctl.serve.engine import Engine, Limits
from tests.conftest import run_cli
from tests.test_serve import sharp_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_vocab) -> Path:
    return sharp_checkpoint(tmp_path_factory.mktemp("chat") / "tiny", tiny_vocab)


@pytest.fixture(scope="module")
def loaded(ckpt, tiny_vocab):
    return load_model(ckpt)[0].eval(), CPMAntTokenizer(tiny_vocab)


def _greedy_reply(loaded, messages, max_tokens) -> str:
    """What the reply must be: greedy `generate` on the rendered conversation, cut at the next turn label."""
    model, tokenizer = loaded
    text = generate(model, tokenizer, [chat_template.render(messages)],
                    GenerationConfig(decode="greedy", max_new_tokens=max_tokens))[0].text
    cuts = [text.index(s) for s in chat_template.STOP if s in text]
    return text[: min(cuts)] if cuts else text


def test_template_and_fitting_drop_the_oldest_turns_first():
    messages = [("system", "规则"), ("user", "一"), ("assistant", "二"), ("user", "三"), ("assistant", "四"),
                ("user", "五")]
    assert chat_template.render(messages) == "规则\n用户：一\n助手：二\n用户：三\n助手：四\n用户：五\n助手："
    count = len  # characters stand in for tokens
    full = len(chat_template.render(messages))
    assert chat_template.fit(messages, count, full) == messages
    # One character short: the oldest exchange goes (a user turn and the reply to it), the system line stays.
    assert chat_template.fit(messages, count, full - 1) == [messages[0]] + messages[3:]
    assert chat_template.fit(messages, count, 1) == [messages[0], messages[-1]]  # the last message always stays


def test_session_commands_and_settings(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, Limits(max_batch=4, max_queue=1, max_prompt_tokens=64, max_new_tokens=8))
    session = ChatSession(engine, {"temperature": 0})
    assert "temperature=0" in session.command("/settings")
    assert "top_k=5" in session.command("/settings decode=sample temperature=0.7 top_k=5")
    assert session.command("/settings system=你是 一个 助手").endswith("system=你是 一个 助手")
    for line, named in [("/settings top_p=2", "top_p"), ("/settings colour=red", "colour"),
                        ("/settings max_tokens=9", "max_tokens"), ("/settings top_k=x", "top_k"),
                        ("/settings decode=beam beam_size=5", "beam_size"), ("/frobnicate", "/frobnicate")]:
        with pytest.raises(CpmctlError, match=named):
            session.command(line)
    assert session.settings["top_k"] == 5 and session.settings.get("beam_size") is None  # unchanged by a refusal
    session.history = [("user", "一"), ("assistant", "二")]
    assert session.command("/reset") == "history cleared" and session.history == []
    with pytest.raises(EndChat):
        session.command("/exit")


def test_piped_chat_keeps_the_history_and_follows_the_commands(ckpt, loaded, capsys, monkeypatch):
    lines = ["/settings temperature=0", "今天天气", "我们去学校", "/reset", "今天天气", "/exit", "never read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    code, out, err = run_cli(capsys, "chat", "--model", ckpt, "--device", "cpu", "--max-tokens", "10", "--json")
    assert code == 0, err
    replies = [json.loads(line) for line in out.splitlines()]
    assert [r["user"] for r in replies] == ["今天天气", "我们去学校", "今天天气"]
    first = _greedy_reply(loaded, [("user", "今天天气")], 10)
    second = _greedy_reply(loaded, [("user", "今天天气"), ("assistant", first), ("user", "我们去学校")], 10)
    assert [r["reply"] for r in replies] == [first, second, first]  # /reset: the same start again
    assert replies[1]["prompt_tokens"] > replies[0]["prompt_tokens"] == replies[2]["prompt_tokens"]
    assert all(r["finish_reason"] == "length" and r["completion_tokens"] == 10 for r in replies)
    assert "settings: temperature=0" in err


def test_piped_chat_drops_old_turns_to_fit_the_window_and_stops_on_bad_input(ckpt, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("今天天气不错\n我们去学校\n北京是中国的首都\n"))
    code, out, err = run_cli(capsys, "chat", "--model", ckpt, "--device", "cpu", "--max-tokens", "12",
                             "--max-prompt-tokens", "40", "--temperature", "0", "--json")
    assert code == 0, err
    replies = [json.loads(line) for line in out.splitlines()]
    assert replies[0]["dropped_messages"] == 0 and replies[-1]["dropped_messages"] > 0
    assert all(r["prompt_tokens"] <= 40 for r in replies)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/settings top_p=7\n今天\n"))
    code, out, err = run_cli(capsys, "chat", "--model", ckpt, "--device", "cpu", "--json")
    assert code == 2 and "top_p" in err and json.loads(out)["error"].startswith("setting")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_chat_on_a_terminal_streams_the_reply_and_survives_bad_input(ckpt, loaded, capsys, monkeypatch):
    """stdin a terminal: `> ` prompts, replies streamed to stdout, a bad command reported without ending the
    session."""
    expected = _greedy_reply(loaded, [("user", "今天天气")], 8)
    monkeypatch.setattr(sys, "stdin", _Terminal("/settings top_p=7\n今天天气\n/exit\n"))
    code, out, err = run_cli(capsys, "chat", "--model", ckpt, "--device", "cpu", "--temperature", "0",
                             "--max-tokens", "8")
    assert code == 0, err
    assert out == f"> > {expected}\n> "
    assert "chatting with tiny" in err and "not chat-tuned" in err and "error: setting 'top_p'" in err
