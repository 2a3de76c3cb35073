"""Tool calling through the model's chat template: the call format, the prompt, the parse back.

The format is read off the template itself: a tool list and an assistant message that calls a
probe tool are rendered through it, and where the call's JSON shows up in the rendering, the text
before and after it (`<tool_call>\\n` ... `\\n</tool_call>` for Qwen and Hermes templates, nothing
for Llama 3.1's bare JSON) and the key of its arguments (`arguments` / `parameters`) are the
format. A template that does not render tools gets kiln's: the tools described in a system
message, calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, results fed back
as user messages in `<tool_response>` tags. `check()` renders a whole round trip, which the build
runs so that a template that cannot carry tools is known before the first request.

    fmt = tool_format(text)                   # ToolFormat
    ids = text.chat_ids(*fmt.render(messages, tools))
    calls, content = fmt.parse(generated_text)
    grammar = fmt.grammar(tools, name=None, parallel=True)   # Lark for tool_choice required / named
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from compiler.runtime.text import Text

PROBE_TOOL = {"type": "function", "function": {
    "name": "kiln_probe_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PROBE_ARGS = {"city": "Paris"}
KILN_START, KILN_END = "<tool_call>\n", "\n</tool_call>"


@dataclass(frozen=True)
class ToolCallOut:
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class ToolFormat:
    source: str  # "template": the template's own | "kiln": kiln's system message and tags
    start: str  # text before a call's JSON
    end: str  # text after it
    args_key: str = "arguments"

    # -- the prompt ------------------------------------------------------------------------------
    def render(self, messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
        """Messages (OpenAI shape: tool_calls with JSON-text arguments, tool results) and the tool
        list -> (messages, tools) to hand the chat template."""
        if self.source == "template":
            return [_template_message(m) for m in messages], tools
        out = []
        if tools:
            out.append({"role": "system", "content": self._system(tools, _system_text(messages))})
        for m in messages:
            if m["role"] == "system" and tools:
                continue  # folded into the tools' system message
            if m["role"] == "tool":
                body = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
                if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                    out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + body}
                else:
                    out.append({"role": "user", "content": body})
            elif m.get("tool_calls"):
                calls = "\n".join(self.call_text(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                  for c in m["tool_calls"])
                out.append({"role": "assistant", "content": ((m.get("content") or "") + "\n" + calls).lstrip("\n")})
            else:
                out.append({"role": m["role"], "content": m.get("content") or ""})
        return out, None

    def _system(self, tools: list[dict], system: str) -> str:
        listing = "\n".join(json.dumps(t["function"]) for t in tools)
        return ((system + "\n\n" if system else "") +
                "You may call one or more functions to assist with the user query. The functions are:\n"
                f"<tools>\n{listing}\n</tools>\n"
                "To call a function, answer with a JSON object with its name and arguments inside tags:\n"
                + self.call_text("function_name", {"argument": "value"}))

    def call_text(self, name: str, args: dict) -> str:
        return f"{self.start}{json.dumps({'name': name, self.args_key: args})}{self.end}"

    # -- the answer ------------------------------------------------------------------------------
    def parse(self, text: str) -> tuple[list[ToolCallOut], str]:
        """(the calls in a generated text, the text outside them)."""
        calls, rest, i = [], [], 0
        dec = json.JSONDecoder()
        while i < len(text):
            at = text.find(self.start, i) if self.start else _first_brace(text, i)
            if at < 0:
                break
            j = at + len(self.start)
            while j < len(text) and text[j].isspace():
                j += 1
            try:
                obj, stop = dec.raw_decode(text, j)
            except ValueError:
                break
            call = self._call(obj)
            if call is None:
                break
            rest.append(text[i:at])
            calls.append(call)
            i = stop
            while i < len(text) and text[i].isspace():
                i += 1
            if self.end.strip() and text.startswith(self.end.strip(), i):
                i += len(self.end.strip())
        tail = text[i:]
        end = self.end.strip()
        if calls and end and any(tail.rstrip().endswith(end[:k]) for k in range(1, len(end))):
            tail = tail.rstrip()[: tail.rstrip().rfind(end[0])]  # a closing tag cut off by the token limit
        rest.append(tail)
        return calls, "".join(rest).strip() if calls else text

    def _call(self, obj) -> ToolCallOut | None:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get(self.args_key, obj.get("arguments", obj.get("parameters", {})))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        return ToolCallOut(obj["name"], json.dumps(args)) if isinstance(args, dict) else None

    def holds(self, text: str) -> int:
        """Where in a growing text a call may begin (len(text): nowhere yet), so streaming holds
        back what could turn into a call."""
        if not self.start:
            at = _first_brace(text, 0)
            return len(text) if at < 0 else at
        at = text.find(self.start)
        if at >= 0:
            return at
        for k in range(min(len(self.start) - 1, len(text)), 0, -1):
            if text.endswith(self.start[:k]):
                return len(text) - k
        return len(text)

    # -- constrained calls -----------------------------------------------------------------------
    def grammar(self, tools: list[dict], name: str | None = None, parallel: bool = True) -> str:
        """A Lark grammar (llguidance) whose sentences are calls of the tools (of `name` only when
        given), their arguments valid against each tool's schema."""
        chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
        schema = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", self.args_key],
                             "properties": {"name": {"const": f["name"]}, self.args_key: f.get("parameters") or {"type": "object"}}}
                            for f in chosen], "x-guidance": {"whitespace_flexible": False}}  # compact, as grammar.py's JSON
        one = f"{json.dumps(self.start)} call {json.dumps(self.end)}" if (self.start or self.end) else "call"
        many = f"start: one (\"\\n\" one)*\n" if parallel else "start: one\n"
        return f"{many}one: {one}\ncall: %json {json.dumps(schema)}\n"


def _first_brace(text: str, i: int) -> int:
    at = text.find("{", i)
    return at


def _system_text(messages: list[dict]) -> str:
    return "\n".join(m.get("content") or "" for m in messages if m["role"] == "system")


def _template_message(m: dict) -> dict:
    """An OpenAI message as chat templates read it: tool-call arguments as objects."""
    if not m.get("tool_calls"):
        return m
    calls = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}} for c in m["tool_calls"]]
    return {**m, "content": m.get("content") or "", "tool_calls": calls}


def tool_format(text: Text) -> ToolFormat:
    """The template's own call format where rendering a probe call shows one; else kiln's."""
    kiln = ToolFormat("kiln", KILN_START, KILN_END)
    if not text.chat_template:
        return kiln
    user = [{"role": "user", "content": "What is the weather in Paris?"}]
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "kiln_probe_weather", "arguments": PROBE_ARGS}}]}
    try:
        prompt = text.apply_chat(user, tools=[PROBE_TOOL])
        if "kiln_probe_weather" not in prompt:
            return kiln
        head = text.apply_chat(user, tools=[PROBE_TOOL], add_generation_prompt=True)
        full = text.apply_chat(user + [call], tools=[PROBE_TOOL], add_generation_prompt=False)
    except Exception:  # noqa: BLE001  (a template that cannot render tools: kiln's format)
        return kiln
    return _read_format(head, full) or kiln


def _read_format(head: str, full: str) -> ToolFormat | None:
    """The format from the prompt alone (head) and the prompt with the probe call (full): what
    lies between their common start and the call's JSON, the JSON's arguments key, what follows."""
    base = len(os.path.commonprefix([head, full]))
    at = full.find('"kiln_probe_weather"', base)
    begin = full.rfind("{", base, at) if at >= 0 else -1
    if begin < 0:
        return None
    try:
        obj, stop = json.JSONDecoder().raw_decode(full, begin)
    except ValueError:
        return None
    key = next((k for k in ("arguments", "parameters") if obj.get(k) == PROBE_ARGS), None)
    if key is None:
        return None
    tail = full[stop:]
    end = tail[: _turn_end(tail)]
    return ToolFormat("template", full[base:begin], end.rstrip() if end.strip() else "", key)


def _turn_end(tail: str) -> int:
    """Where the assistant's turn ends in the text after a call: its first special-looking tag."""
    for marker in ("<|", "</s>", "<eos>", "<end_of_turn>"):
        k = tail.find(marker)
        if k >= 0 and not tail.startswith("</tool_call>", k):
            return k
    return len(tail)


def check(text: Text, fmt: ToolFormat) -> None:
    """Render a whole round trip (tools, a call, its result) in fmt and parse the call back;
    raises ValueError saying what fails."""
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_0", "type": "function", "function": {
                    "name": "kiln_probe_weather", "arguments": json.dumps(PROBE_ARGS)}}]},
                {"role": "tool", "tool_call_id": "call_0", "content": "18 C, sunny"}]
    msgs, tools = fmt.render(messages, [PROBE_TOOL])
    rendered = text.apply_chat(msgs, tools=tools)
    if "18 C, sunny" not in rendered:
        raise ValueError("the chat template drops the tool result")
    calls, _ = fmt.parse(fmt.call_text("kiln_probe_weather", PROBE_ARGS))
    if [c.name for c in calls] != ["kiln_probe_weather"] or json.loads(calls[0].arguments) != PROBE_ARGS:
        raise ValueError("a tool call in the template's format does not parse back")


def usable_format(text: Text) -> tuple[ToolFormat | None, str]:
    """(the template's tool format after check() passed, "") or (None, why tools cannot be used)."""
    if not text.chat_template:
        return None, "the engine has no chat template"
    fmt = tool_format(text)
    try:
        check(text, fmt)
    except Exception as e:  # noqa: BLE001  (any template failure means no tools)
        return None, str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return fmt, ""
