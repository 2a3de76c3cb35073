"""/v1/completions and /v1/chat/completions: a request -> the engine core's jobs -> OpenAI's body
or its server-sent events.

A request becomes one job per choice (`n`, and each prompt of a completions batch): each job is
a sequence of its own in the core, the siblings of one prompt sharing its KV blocks through the
prefix cache, choice j > 0 seeded from (seed, j) so a seeded request is reproducible. Everything
that can be refused is refused before the first job is submitted (400 naming the field), so a
refused request takes no row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from compiler.runtime.engine import Engine, Generation, GenerationConfig
from compiler.runtime.grammar import GrammarSpec
from compiler.runtime.tools import ToolFormat
from compiler.serve.api import ChatRequest, CompletionRequest, Message, NamedTool, Params
from compiler.serve.bodies import ChatChoice, chat_logprobs, completion_logprobs, echo_logprobs, usage
from compiler.serve.jobs import Job, Overloaded, Piece, Unavailable
from compiler.serve.metrics import Metrics
from compiler.serve.reply import ApiError, JobStream, Reply, failure
from compiler.serve.worker import EngineWorker


@dataclasses.dataclass
class Plan:
    """What a request asked for, ready to run: per job its prompt ids and config."""

    chat: bool
    prompts: list[list[int]]  # the distinct prompts
    configs: list[GenerationConfig]  # per choice of a prompt (len n)
    tools: ToolFormat | None = None  # parse tool calls out of the answers
    echo: bool = False
    stream: bool = False
    include_usage: bool = False

    @property
    def jobs(self) -> list[tuple[int, GenerationConfig]]:
        """(prompt index, config) per job; the job's index is its choice index."""
        return [(p, c) for p in range(len(self.prompts)) for c in self.configs]


class Generations:
    def __init__(self, engine: Engine, name: str, batcher: EngineWorker, metrics: Metrics, tools: ToolFormat | None,
                 no_tools: str = ""):
        """tools: the chat template's tool format (runtime/tools.py); None, and why: tools are refused."""
        self.engine, self.name, self.batcher, self.metrics, self.fmt = engine, name, batcher, metrics, tools
        self.no_tools = no_tools
        self.text = engine.text

    # -- requests -> plans -----------------------------------------------------------------------
    def chat_plan(self, req: ChatRequest) -> Plan:
        messages = [chat_message(m) for m in req.messages]
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice or ("auto" if tools else "none")
        active = tools if choice != "none" else None
        if (tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)) and self.fmt is None:
            raise ApiError(400, f"this engine cannot take tools ({self.no_tools}); send the request without tools",
                           "tools", code="tools_unsupported")
        grammar = _grammar(req)
        if active and choice != "auto":
            if grammar is not None:
                raise ApiError(400, "tool_choice required or a named tool cannot be combined with another structured "
                               "output; drop one", "tool_choice")
            named = choice.function.name if isinstance(choice, NamedTool) else None
            grammar = GrammarSpec("lark", self.fmt.grammar(active, named, req.parallel_tool_calls))
        msgs, template_tools = self.fmt.render(messages, active) if self.fmt else (messages, None)
        try:
            ids = self.text.chat_ids(msgs, template_tools)
        except ValueError as e:
            raise ApiError(400, f"invalid request: messages: {e}", "messages") from None
        k = (req.top_logprobs or 0) if req.logprobs else None
        config = req.config(True, req.max_completion_tokens or req.max_tokens, k, None, grammar)
        return Plan(True, [ids], _choices(config, req.n), self.fmt if active else None, stream=req.stream,
                    include_usage=req.include_usage)

    def completion_plan(self, req: CompletionRequest) -> Plan:
        prompts = [self._prompt_ids(p) for p in req.prompts()]
        k = req.logprobs
        config = req.config(False, req.max_tokens, k, k if req.echo and k is not None else None, _grammar(req))
        return Plan(False, prompts, _choices(config, req.n), echo=req.echo, stream=req.stream,
                    include_usage=req.include_usage)

    def _prompt_ids(self, p: str | list[int]) -> list[int]:
        return self.text.encode(p) if isinstance(p, str) else checked_ids(p, self.engine.config.vocab_size, "prompt")

    # -- running ---------------------------------------------------------------------------------
    async def run(self, request: Request, plan: Plan, endpoint: str) -> Response:
        t0 = time.perf_counter()
        for ids in plan.prompts:  # length, settings, grammar, KV budget: a plain 400 before any job
            for config in {c.seed: c for c in plan.configs}.values():
                try:
                    self.batcher.core.validate(ids, config)
                except ValueError as e:
                    raise ApiError(400, f"invalid request: {e}") from None
        loop = asyncio.get_running_loop()
        jobs = [Job(plan.prompts[p], c, loop, asyncio.Queue()) for p, c in plan.jobs]
        self._submit(jobs)
        reply = Reply(jobs, endpoint, self.metrics, t0)
        rid = f"{'chatcmpl' if plan.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if plan.stream:
            return JobStream(self._events(reply, rid, plan), reply)
        try:
            return await self._whole(request, reply, rid, plan)
        finally:
            reply.close()

    def _submit(self, jobs: list[Job]) -> None:
        for i, job in enumerate(jobs):
            try:
                self.batcher.submit(job)
            except (Overloaded, Unavailable) as e:
                for j in jobs[:i]:
                    j.cancel()
                if isinstance(e, Overloaded):
                    raise ApiError(429, "server busy: the request queue is full, retry later", kind="overloaded") from None
                raise ApiError(503, str(e), kind="unavailable") from None

    async def _whole(self, request: Request, reply: Reply, rid: str, plan: Plan) -> Response:
        gens: dict[int, Generation] = {}
        async for i, item in reply.items(request):
            if isinstance(item, Exception):
                status, kind = failure(item)
                raise ApiError(status, str(item), kind=kind)
            if isinstance(item, Generation):
                gens[i] = item
        if len(gens) < len(reply.jobs):  # the client has gone: nobody reads this
            return Response(status_code=499)
        choices = [self._choice(i, gens[i], plan) for i in range(len(gens))]
        n_prompt = sum(len(p) for p in plan.prompts)
        return JSONResponse({"id": rid, "object": "chat.completion" if plan.chat else "text_completion",
                             "created": int(time.time()), "model": self.name, "choices": choices,
                             "usage": usage(n_prompt, sum(len(g.token_ids) for g in gens.values()))})

    def _choice(self, i: int, gen: Generation, plan: Plan) -> dict:
        config = plan.configs[i % len(plan.configs)]
        if plan.chat:
            c = ChatChoice(plan.tools)
            c.text = gen.text
            message, called = c.message()
            return {"index": i, "message": message, "finish_reason": _finish(gen.finish_reason, called),
                    "logprobs": None if config.logprobs is None else chat_logprobs(self.text, gen.logprobs)}
        ids = plan.prompts[i // len(plan.configs)]
        prompt = self.text.decode(ids) if plan.echo else ""
        logprobs = None
        if config.logprobs is not None:
            logprobs = completion_logprobs(self.text, gen.logprobs, len(prompt))
            if plan.echo:
                head = echo_logprobs(self.text, ids, gen.prompt_logprobs)
                logprobs = {k: head[k] + logprobs[k] for k in logprobs}
        return {"index": i, "text": prompt + gen.text, "finish_reason": gen.finish_reason, "logprobs": logprobs}

    async def _events(self, reply: Reply, rid: str, plan: Plan):
        obj = "chat.completion.chunk" if plan.chat else "text_completion"
        created = int(time.time())
        n = len(reply.jobs)

        def event(choices: list[dict], **extra) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": self.name, "choices": choices, **extra}
            return "data: " + json.dumps(body) + "\n\n"

        def chunk(i: int, piece: str | None = None, finish: str | None = None, lps: list | None = None, **delta) -> str:
            config = plan.configs[i % len(plan.configs)]
            if plan.chat:
                c = {"index": i, "delta": {**({"content": piece} if piece else {}), **delta}, "finish_reason": finish}
                c["logprobs"] = chat_logprobs(self.text, lps) if lps and config.logprobs is not None else None
            else:
                c = {"index": i, "text": piece or "", "finish_reason": finish,
                     "logprobs": completion_logprobs(self.text, lps) if lps and config.logprobs is not None else None}
            return event([c])

        states = [ChatChoice(plan.tools) for _ in range(n)]
        for i in range(n):
            if plan.chat:
                yield chunk(i, role="assistant")
            elif plan.echo:
                yield chunk(i, self.text.decode(plan.prompts[i // len(plan.configs)]))
        tokens = 0
        async for i, item in reply.items():
            if isinstance(item, Exception):  # the stream has started: report in-band
                yield "data: " + json.dumps({"error": {"message": str(item), "type": failure(item)[1]}}) + "\n\n"
            elif isinstance(item, Piece):
                piece = states[i].push(item.text) if plan.chat else item.text
                if piece or item.logprobs:
                    yield chunk(i, piece, lps=list(item.logprobs))
            else:
                tokens += len(item.token_ids)
                rest, calls = states[i].finish() if plan.chat else ("", [])
                if rest:
                    yield chunk(i, rest)
                if calls:
                    yield chunk(i, tool_calls=[{"index": k, **c} for k, c in enumerate(calls)])
                yield chunk(i, finish=_finish(item.finish_reason, bool(calls)))
        if plan.include_usage:
            yield event([], usage=usage(sum(len(p) for p in plan.prompts), tokens))
        yield "data: [DONE]\n\n"


def checked_ids(tokens: list[int], vocab: int, field: str) -> list[int]:
    """Token ids a client sent, each inside the vocabulary (else 400 naming the field)."""
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"invalid request: {field}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", field)
    return list(tokens)


def chat_message(m: Message) -> dict:
    """A request message as the chat template and the tool format read it."""
    out = {"role": "system" if m.role == "developer" else m.role, "content": m.text() if m.content is not None else None}
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name:
        out["name"] = m.name
    if out["content"] is None:
        out["content"] = ""
    return out


def _finish(reason: str, called: bool) -> str:
    """OpenAI's finish_reason: tool_calls for an answer that ends in calls (length if cut off)."""
    return "tool_calls" if called and reason == "stop" else reason


def _grammar(req: Params) -> GrammarSpec | None:
    try:
        return req.grammar()
    except ValueError as e:
        raise ApiError(400, f"invalid request: {e}", "response_format") from None


def _choices(config: GenerationConfig, n: int) -> list[GenerationConfig]:
    """n configs: choice 0 as asked, choice j seeded from (seed, j) when a seed is given."""
    if config.seed is None:
        return [config] * n
    seeds = [config.seed] + [int(np.random.SeedSequence([config.seed, j]).generate_state(1, np.uint64)[0]) >> 1
                             for j in range(1, n)]
    return [dataclasses.replace(config, seed=s) for s in seeds]
