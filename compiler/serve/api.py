"""The request bodies kiln serve takes, as OpenAI's and vLLM's clients send them, and their
conversion into the engine core's GenerationConfig.

Every field is declared: a field kiln does not implement is refused with 400 naming it
(`extra="forbid"`), and so is a field it declares only to refuse a value that would change the
output (a non-zero `presence_penalty`, a `logit_bias`). One structured-output field at a time:
`response_format` (json_object, json_schema), or vLLM's `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar` or its `structured_outputs` object.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from compiler.runtime.generation import GenerationConfig
from compiler.runtime.grammar import GrammarSpec
from compiler.runtime.logprobs import MAX_TOP

MAX_N = 16  # choices a request may ask for


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchema(Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object with its schema")
        return self


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs` object: one of its fields."""
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class Params(Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=32768)
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 and 0: off
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    user: str | None = None  # an end-user id for the caller's own records; it changes nothing
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # vLLM's extension
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("repetition penalties are not implemented by kiln; send 0 or leave the field out")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("logit_bias is not implemented by kiln; leave the field out")
        return v

    def grammar(self) -> GrammarSpec | None:
        """The one structured-output constraint the request asks for, if any."""
        asked = {k: v for k, v in self._grammar_fields().items() if v is not None}
        if len(asked) > 1:
            raise ValueError(f"ask for one structured output at a time, got {' and '.join(sorted(asked))}")
        return next(iter(asked.values()), None)

    def _grammar_fields(self) -> dict[str, GrammarSpec | None]:
        rf, so = self.response_format, self.structured_outputs
        fields = {"response_format": None if rf is None or rf.type == "text" else
                  GrammarSpec("json_object") if rf.type == "json_object" else _schema(rf.json_schema.schema_),
                  "guided_json": None if self.guided_json is None else _schema(self.guided_json),
                  "guided_regex": None if self.guided_regex is None else GrammarSpec("regex", self.guided_regex),
                  "guided_choice": None if self.guided_choice is None else GrammarSpec("choice", json.dumps(self.guided_choice)),
                  "guided_grammar": None if self.guided_grammar is None else GrammarSpec("lark", self.guided_grammar)}
        if so is not None:
            given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(so, k) is not None]
            if len(given) != 1:
                raise ValueError("structured_outputs takes exactly one of json, regex, choice, grammar")
            k = given[0]
            v = getattr(so, k)
            fields["structured_outputs"] = (_schema(v) if k == "json_" else GrammarSpec("choice", json.dumps(v))
                                            if k == "choice" else GrammarSpec("lark" if k == "grammar" else "regex", v))
        return fields

    def config(self, chat: bool, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
               grammar: GrammarSpec | None) -> GenerationConfig:
        top_k = self.top_k if self.top_k and self.top_k > 0 else 0
        return GenerationConfig.of(max_tokens=max_tokens or 128, temperature=self.temperature, top_k=top_k, top_p=self.top_p,
                                   seed=self.seed, stop=self.stop, chat=chat, ignore_eos=self.ignore_eos, grammar=grammar,
                                   logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def _schema(schema: dict | str) -> GrammarSpec:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"the JSON schema is not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise ValueError("a JSON schema must be an object")
    return GrammarSpec("json_schema", json.dumps(schema)) if schema else GrammarSpec("json_object")


class CompletionRequest(Params):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP)
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, p):
        if isinstance(p, str) and not p or isinstance(p, list) and (not p or any(not x for x in p if not isinstance(x, int))):
            raise ValueError("the prompt is empty: send text or token ids")
        return p

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v not in (None, info.data.get("n", 1)):
            raise ValueError("best_of other than n is not implemented by kiln; leave it out")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class FunctionDef(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedTool(Strict):
    type: Literal["function"]
    function: NamedFunction


class CalledFunction(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, v: str) -> str:
        try:
            ok = isinstance(json.loads(v), dict)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("a tool call's arguments must be a JSON object as text")
        return v


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ContentPart(Strict):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text" or self.text is None:
            raise ValueError(f"content part type {self.type!r} is not supported: this engine takes text parts "
                             "({type: text, text: ...})")
        return self


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _has_content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(Params):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool = True

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @field_validator("tools")
    @classmethod
    def _unique(cls, v: list[Tool] | None) -> list[Tool] | None:
        names = [t.function.name for t in v or []]
        if len(set(names)) != len(names):
            raise ValueError("two tools have the same name")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _known_tool(cls, v, info: ValidationInfo):
        names = [t.function.name for t in info.data.get("tools") or []]
        if isinstance(v, NamedTool) and v.function.name not in names:
            raise ValueError(f"tool_choice names {v.function.name!r}, which is not among the tools")
        if v == "required" and not names:
            raise ValueError("tool_choice required needs tools")
        return v


class EmbeddingRequest(Strict):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send prompt or messages")
        return self


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]
