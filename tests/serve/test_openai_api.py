"""kiln serve driven by the official `openai` client: structured outputs, tool calls, logprobs and
echo, n with seeds, usage in streams, the request shapes clients send, and the errors (status,
OpenAI's error object, no KV left behind). Tiny random Llama (chunked prefill, prefix cache) and
SmolLM2-135M when `make model` has fetched it."""

from __future__ import annotations

import json

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from compiler.build.evaluate import _chunks
from compiler.runtime.settings import RuntimeSettings
from tests.conftest import SMOLLM2_DIR, build_artifact, make_tiny
from tests.serve.loopback import Server

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "member", "tags", "city", "email"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "member": {"type": "boolean"}, "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                         "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.org$"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                                                           "properties": {"city": {"type": "string", "maxLength": 12}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "required": ["zone"], "additionalProperties": False, "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}}}}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
CHUNKED = RuntimeSettings(max_num_batched_tokens=8, prefix_cache_tokens=256, prefix_block_size=4)


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def server(request, tmp_path_factory):
    if request.param == "tiny":  # room for kiln's tool prompt in the tiny tokenizer's tokens
        root = tmp_path_factory.mktemp("tiny")
        art = build_artifact(make_tiny("llama", root / "src", max_position_embeddings=1024), root, "tiny", max_seq=1024)
        s = Server(art, settings=CHUNKED)
    else:
        if not (SMOLLM2_DIR / "config.json").is_file():
            pytest.skip("run `make model` first")
        s = Server(build_artifact(SMOLLM2_DIR, tmp_path_factory.mktemp("smol"), "smol", max_seq=512, max_batch=4))
    yield s
    s.stop()


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="kiln", max_retries=0, timeout=120) as c:
        yield c
    assert_no_kv_left(server)


def assert_no_kv_left(server) -> None:
    body = httpx.get(server.url + "/metrics").text
    for line in ("kiln_running_sequences 0.0", "kiln_waiting_sequences 0.0", "kiln_kv_rows_used 0.0", "kiln_kv_blocks_used 0.0"):
        assert line in body, line


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


# -- structured outputs -------------------------------------------------------------------------
def test_every_json_schema_answer_parses_and_validates(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=200, n=3, seed=11, temperature=1.0,
                                       response_format=schema_format(PERSON))
    assert len(r.choices) == 3
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    streamed = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=200, stream=True,
                                              response_format=schema_format(PERSON))
    text = "".join(ev.choices[0].delta.content or "" for ev in streamed if ev.choices)
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("extra,check", [
    ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
    ({"extra_body": {"guided_regex": "[0-9]{3}-[0-9]{4}"}}, lambda t: len(t) == 8 and t[3] == "-" and t.replace("-", "").isdigit()),
    ({"extra_body": {"guided_choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
    ({"extra_body": {"structured_outputs": {"choice": ["red", "blue"]}}}, lambda t: t in ("red", "blue")),
    ({"extra_body": {"guided_grammar": 'start: "A" ("b" | "c") ("b" | "c")? "!"'}}, lambda t: t[0] == "A" and t[-1] == "!"),
])
def test_other_constraints(client, extra, check):
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=256, **extra)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and check(text), text


def test_completions_take_a_schema_and_token_ids(client, server):
    ids = server.engine.text.encode("The river")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=200, extra_body={"guided_json": PERSON})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    assert r.usage.prompt_tokens == len(ids)


def test_constrained_speculative_serving_answers_as_plain_serving(server):
    body = {"model": "tiny", "messages": ASK, "max_tokens": 120, "response_format": schema_format(PERSON)}
    want = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]["content"]
    spec = Server(server.engine.path, settings=RuntimeSettings(speculate="ngram", num_speculative=4))
    try:
        got = httpx.post(spec.url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]["content"]
        stats = spec.batcher.core.stats
    finally:
        spec.stop()
    assert got == want and stats["proposed"] > 0, stats


# -- tools --------------------------------------------------------------------------------------
def test_tool_calls_round_trip(client):
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    r = client.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER, CLOCK], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    tool = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    follow = ask + [choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "-3 C and snowing"}]
    after = client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER, CLOCK], max_tokens=8)
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_the_build_records_the_tool_format(server):
    manifest = json.loads((server.engine.path / "kiln.json").read_text())
    assert manifest["tools"]["format"] == "kiln" and manifest["tools"]["start"] == "<tool_call>\n"
    assert "- tool calls: kiln's format" in (server.engine.path / "README.md").read_text()


def test_a_named_tool_is_called_and_streamed_as_deltas(client):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Time?"}], max_tokens=200,
                                            tools=[WEATHER, CLOCK], parallel_tool_calls=False, stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls, finish = [], None
    for ev in stream:
        if ev.choices and ev.choices[0].delta.tool_calls:
            calls += ev.choices[0].delta.tool_calls
        if ev.choices and ev.choices[0].finish_reason:
            finish = ev.choices[0].finish_reason
    assert finish == "tool_calls" and [c.function.name for c in calls] == ["get_time"]
    assert json.loads(calls[0].function.arguments)["zone"] in ("UTC", "CET")


# -- logprobs, echo, n ---------------------------------------------------------------------------
def _scores(server, ids: list[int]) -> np.ndarray:
    """log p(ids[i + 1] | ids[:i + 1]) from the engine's own logits, as `kiln eval` scores them."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.concatenate([lp[np.arange(len(t)), t] for t, lp in _chunks(server.engine, ids, 64, False, "")])


def test_logprobs_are_the_engines_log_softmax(client, server):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, logprobs=3)
    ids = server.engine.text.encode("Once upon a time")
    gen = server.engine.generate("Once upon a time", max_new_tokens=6)
    want = _scores(server, ids + gen.token_ids)[len(ids) - 1:]
    got = r.choices[0].logprobs.token_logprobs
    assert np.allclose(got, want[: len(got)], atol=1e-4), (got, want)
    assert all(len(t) <= 3 for t in r.choices[0].logprobs.top_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=5, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-9 for c in content)


def test_echo_logprobs_equal_the_eval_scores(client, server):
    prompt = "The capital of France is a city on the river"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, echo=True, logprobs=0)
    ids = server.engine.text.encode(prompt)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt) and lp.token_logprobs[0] is None
    assert np.allclose(lp.token_logprobs[1: len(ids)], _scores(server, ids), atol=1e-4)


def test_n_with_a_seed_is_reproducible(client):
    body = dict(model="tiny", prompt="Once upon a time", max_tokens=12, n=3, seed=1234, temperature=1.0)
    a = [c.text for c in client.completions.create(**body).choices]
    b = [c.text for c in client.completions.create(**body).choices]
    assert a == b and len(set(a)) > 1


def test_usage_comes_last_when_asked(client):
    events = list(client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))
    assert events[-1].choices == [] and events[-1].usage.completion_tokens >= 1
    assert all(ev.usage is None for ev in events[:-1])


def test_request_shapes_clients_send(client, server):
    messages = [{"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "Name"}, {"type": "text", "text": "a river."}]}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=3)
    assert r.usage.completion_tokens <= 3
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "Name a river."}).json()
    assert tok["tokens"] == server.engine.text.encode("Name a river.") and tok["count"] == len(tok["tokens"])
    back = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert back["prompt"] == "Name a river."


# -- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,status,param", [
    ({"model": "gpt-4o"}, 404, "model"),
    ({"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"extra_body": {"best_of_n": 2}}, 400, "best_of_n"),
    ({"response_format": schema_format({"type": "object", "properties": {"a": {"type": "strin"}}})}, 400, None),
    ({"extra_body": {"guided_regex": "([a-z"}}, 400, None),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, 400, "response_format"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "launch"}}}, 400, "tool_choice"),
    ({"n": 17}, 400, "n"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None),
    ({"extra_body": {"logprobs": 2}}, 400, "logprobs"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "get_weather", "arguments": "{not json"}}]}]}, 400, None),
    ({"messages": [{"role": "tool", "content": "18 C"}]}, 400, None),
])
def test_refused_requests_get_the_status_and_openais_error_shape(client, kwargs, status, param):
    body = {"model": "tiny", "messages": ASK, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(**body)
    e = err.value
    assert e.status_code == status, e.body
    assert set(e.body) >= {"message", "type", "param", "code"} and e.body["message"]
    if param:
        assert e.body["param"] == param and param.split(".")[0] in e.body["message"], e.body


def test_oversize_and_bad_token_requests(server, client):
    r = httpx.post(server.url + "/v1/completions", content=b"{" + b" " * (33 << 20) + b"}",
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [1, 10 ** 9], "max_tokens": 2})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/embeddings", json={"input": "hi"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_endpoint"


def test_a_chunked_oversize_body_and_unknown_routes_get_openais_shape(server):
    def chunks():
        for _ in range(40):
            yield b" " * (1 << 20)

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_n_choices_share_the_prompts_kv_blocks(client, server):
    prompt = "Once upon a time, in a land far away, there lived a king who had three daughters and no sons"
    n_prompt = len(server.engine.text.encode(prompt))
    before = server.batcher.core.stats["prefill_tokens"]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, n=3, temperature=1.0, seed=3)
    fed = server.batcher.core.stats["prefill_tokens"] - before
    assert len(r.choices) == 3 and r.usage.prompt_tokens == n_prompt
    assert fed < 2 * n_prompt, (fed, n_prompt)  # three prompts computed once, and the siblings' last blocks


def test_streamed_logprobs_equal_the_whole_answers(client):
    body = dict(model="tiny", messages=ASK, max_tokens=8, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**body).choices[0].logprobs.content
    streamed = [c for ev in client.chat.completions.create(**body, stream=True) if ev.choices and ev.choices[0].logprobs
                for c in ev.choices[0].logprobs.content]
    assert [(c.token, round(c.logprob, 6)) for c in streamed] == [(c.token, round(c.logprob, 6)) for c in whole]


def test_a_client_that_hangs_up_on_n_streams_frees_every_row(server):
    from tests.serve.loopback import post_raw, read_until, wait_for

    sock = post_raw(server.port, "/v1/chat/completions", {"messages": ASK, "max_tokens": 200, "n": 3, "stream": True,
                                                          "response_format": {"type": "json_object"}})
    read_until(sock, b"data: {")
    sock.close()
    wait_for(lambda: not server.batcher.running and not server.batcher.depth, "the three choices to be dropped")
    assert_no_kv_left(server)
