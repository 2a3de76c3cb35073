"""OpenAI response shapes: logprobs as chat and completions report them, tool calls, usage, and a
chat choice's stream that holds back text which may turn out to be a tool call."""

from __future__ import annotations

import uuid

from compiler.runtime.logprobs import TokenLogprob
from compiler.runtime.text import Text
from compiler.runtime.tools import ToolCallOut, ToolFormat


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(text: Text, lps: list[TokenLogprob]) -> dict:
    """{"content": [{token, logprob, bytes, top_logprobs: [...]}]}: chat's shape."""
    def entry(t: int, lp: float) -> dict:
        s = text.decode([t])
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {"content": [{**entry(x.token, x.logprob), "top_logprobs": [entry(t, lp) for t, lp in x.top]} for x in lps]}


def completion_logprobs(text: Text, lps: list[TokenLogprob | None], offset: int = 0) -> dict:
    """{tokens, token_logprobs, top_logprobs, text_offset}: completions' shape; None entries are
    tokens without a logprob (the first prompt token under echo)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for x in lps:
        if x is None:
            continue
        s = text.decode([x.token])
        out["tokens"].append(s)
        out["token_logprobs"].append(x.logprob)
        out["top_logprobs"].append({text.decode([t]): lp for t, lp in x.top})
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def echo_logprobs(text: Text, ids: list[int], scores: list[TokenLogprob | None]) -> dict:
    """The prompt's tokens under echo: the first has no logprob (null), as OpenAI reports it."""
    out = completion_logprobs(text, [s for s in scores if s is not None], len(text.decode(ids[:1])))
    first = text.decode(ids[:1])
    return {"tokens": [first] + out["tokens"], "token_logprobs": [None] + out["token_logprobs"],
            "top_logprobs": [None] + out["top_logprobs"], "text_offset": [0] + out["text_offset"]}


def tool_calls(calls: list[ToolCallOut]) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


class ChatChoice:
    """One chat choice being streamed: its content as it becomes safe to send, and at the end its
    tool calls (when the request has tools) parsed from the whole text."""

    def __init__(self, fmt: ToolFormat | None):
        self.fmt, self.text, self.sent = fmt, "", 0

    def push(self, piece: str) -> str:
        """Content that can be sent now."""
        self.text += piece
        safe = self.fmt.holds(self.text) if self.fmt else len(self.text)
        out = self.text[self.sent: max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content not sent yet, tool calls)."""
        if self.fmt is None:
            return self.text[self.sent:], []
        calls, content = self.fmt.parse(self.text)
        if not calls:
            return self.text[self.sent:], []
        return content[self.sent:] if content.startswith(self.text[: self.sent]) else "", tool_calls(calls)

    def message(self) -> tuple[dict, bool]:
        """The whole message of a non-streamed choice, and whether it calls tools."""
        if self.fmt is not None:
            calls, content = self.fmt.parse(self.text)
            if calls:
                return {"role": "assistant", "content": content or None, "tool_calls": tool_calls(calls)}, True
        return {"role": "assistant", "content": self.text}, False
