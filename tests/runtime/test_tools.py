"""Tool-call formats read off chat templates: a template with its own tool format (tagged JSON with
`arguments`, and bare JSON with `parameters`), one without (kiln's format), the prompt rendered
with tools and results, calls parsed back, and the grammar that forces a call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compiler.runtime.grammar import GrammarSpec, Grammars
from compiler.runtime.text import Text
from compiler.runtime.tools import PROBE_TOOL, ToolFormat, check, tool_format, usable_format
from tests.tiny_models import tiny_tokenizer

# written for these tests in the manner of tool-calling templates: tools listed in the system
# turn, an assistant's calls in tags, tool results in their own turn
TAGGED = """{%- if tools %}<|im_start|>system
Tools:
{% for t in tools %}{{ t.function | tojson }}
{% endfor %}Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>{{ m.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
BARE = """{%- for m in messages %}<|im_start|>{{ m.role }}
{%- if tools and loop.first %} tools: {{ tools | tojson }}{% endif %}
{% if m.tool_calls %}{% for c in m.tool_calls %}{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}{% endfor %}
{%- else %}{{ m.content }}{% endif %}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def text_with(tmp_path: Path, template: str | None) -> Text:
    tiny_tokenizer(tmp_path)
    if template is not None:
        (tmp_path / "chat_template.jinja").write_text(template)
    return Text(tmp_path)


def test_the_templates_own_tagged_format(tmp_path):
    text = text_with(tmp_path, TAGGED)
    fmt = tool_format(text)
    assert fmt == ToolFormat("template", "<tool_call>\n", "\n</tool_call>", "arguments")
    check(text, fmt)
    calls, content = fmt.parse('Let me look. <tool_call>\n{"name": "w", "arguments": {"city": "Oslo"}}\n</tool_call>')
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("w", {"city": "Oslo"})] and content == "Let me look."
    msgs, tools = fmt.render([{"role": "user", "content": "hi"}], [PROBE_TOOL])
    assert tools == [PROBE_TOOL] and "kiln_probe_weather" in text.apply_chat(msgs, tools)


def test_bare_json_with_parameters(tmp_path):
    text = text_with(tmp_path, BARE)
    fmt = tool_format(text)
    assert fmt.source == "template" and fmt.start == "" and fmt.end == "" and fmt.args_key == "parameters"
    calls, _ = fmt.parse('{"name": "w", "parameters": {"city": "Lima"}}')
    assert calls[0].name == "w" and json.loads(calls[0].arguments) == {"city": "Lima"}
    assert fmt.parse("no call here")[0] == []


def test_a_template_without_tools_gets_kilns_format(tmp_path):
    text = text_with(tmp_path, "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fmt = tool_format(text)
    assert fmt.source == "kiln"
    check(text, fmt)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {
                   "name": "kiln_probe_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "c", "content": "-3 C"}, {"role": "tool", "tool_call_id": "d", "content": "snow"}]
    msgs, tools = fmt.render(history, [PROBE_TOOL])
    assert tools is None and msgs[0]["role"] == "system" and msgs[0]["content"].startswith("Be brief.")
    assert '{"name": "kiln_probe_weather", "arguments": {"city": "Oslo"}}' in msgs[2]["content"]
    assert msgs[3] == {"role": "user", "content": "<tool_response>\n-3 C\n</tool_response>\n<tool_response>\nsnow\n</tool_response>"}


@pytest.mark.parametrize("template", [TAGGED, BARE, None])
def test_the_forced_call_grammar_is_valid_and_names_the_tool(tmp_path, template):
    text = text_with(tmp_path, template)
    fmt = tool_format(text)
    grammars = Grammars(text, 384, [2])
    c = grammars.constraint(GrammarSpec("lark", fmt.grammar([PROBE_TOOL], "kiln_probe_weather", parallel=False)))
    good = text.encode(fmt.call_text("kiln_probe_weather", {"city": "Rome"}).replace(": ", ":").replace(", ", ","),
                       add_special_tokens=False)
    assert c.prefix(good) == len(good)
    bad = text.encode(fmt.call_text("launch", {"city": "Rome"}).replace(": ", ":"), add_special_tokens=False)
    assert c.prefix(bad) < len(bad)


def test_streaming_holds_back_what_may_become_a_call():
    fmt = ToolFormat("kiln", "<tool_call>\n", "\n</tool_call>")
    assert fmt.holds("Sure <tool") == len("Sure ") and fmt.holds("Sure") == 4 and fmt.holds("a <tool_call>\n{") == 2


def test_a_template_that_drops_tool_results_is_unusable(tmp_path):
    fmt, why = usable_format(text_with(tmp_path, "{{ messages[0]['content'] }}"))
    assert fmt is None and "drops the tool result" in why
