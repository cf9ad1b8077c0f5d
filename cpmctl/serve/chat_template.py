"""The plain-text conversation template of `/v1/chat/completions` and `cpmctl chat`.

CPM-Ant is a language model, not a chat-tuned one: a conversation is written as a text it can continue, one turn
per line, and the reply is what it writes after the last `助手：` up to the next turn label (or </s>):

    {system}
    用户：{user}
    助手：{assistant}
    用户：{user}
    助手：

The system line is present only when there is a system message; several system messages are joined by newlines.
Newlines inside a message are kept (the tokenizer's </n>).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

USER, ASSISTANT = "用户：", "助手："
LABELS = {"user": USER, "assistant": ASSISTANT}
# A reply ends where the model starts the next turn.
STOP = ("\n" + USER, "\n" + ASSISTANT)


def render(messages: Sequence[tuple[str, str]]) -> str:
    """The prompt of a conversation (role, text) whose last message is the user's."""
    system = "\n".join(text for role, text in messages if role == "system")
    lines = [system] if system else []
    lines += [LABELS[role] + text for role, text in messages if role != "system"]
    return "\n".join(lines + [ASSISTANT])


def fit(messages: list[tuple[str, str]], count_tokens: Callable[[str], int], limit: int) -> list[tuple[str, str]]:
    """The conversation with its oldest turns dropped (system messages kept) until the prompt holds at most
    `limit` tokens; the last user message always stays, so the result may still be too long."""
    system = [m for m in messages if m[0] == "system"]
    turns = [m for m in messages if m[0] != "system"]
    while len(turns) > 1 and count_tokens(render(system + turns)) > limit:
        turns = turns[1:]
        while len(turns) > 1 and turns[0][0] != "user":  # a conversation starts with the user's turn
            turns = turns[1:]
    return system + turns
