"""/v1/embeddings on an encoder artifact, through the openai client: the engine's own embeddings, as
floats and as base64, for texts and token ids; the generation routes refuse an encoder by name."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import build_artifact
from tests.serve.loopback import Server
from tests.tiny_models import make_bert

TEXTS = ["The quick brown fox.", "Attention masks keep padding out of the mean.", "Short."]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    s = Server(build_artifact(make_bert(root / "src"), root, "bert", max_seq=128))
    yield s
    s.stop()


def test_embeddings_are_the_engines(server):
    want = server.engine.embed(TEXTS)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="kiln", max_retries=0) as c:
        floats = c.embeddings.create(model="tiny", input=TEXTS)
        b64 = c.embeddings.create(model="tiny", input=TEXTS, encoding_format="base64")
        ids = c.embeddings.create(model="tiny", input=[server.engine.text.encode(t) for t in TEXTS])
        one = c.embeddings.create(model="tiny", input=TEXTS[0])
    assert np.allclose([d.embedding for d in floats.data], want, atol=1e-6)
    assert np.allclose([d.embedding for d in ids.data], want, atol=1e-6)
    assert np.allclose(one.data[0].embedding, want[0], atol=1e-6) and [d.index for d in floats.data] == [0, 1, 2]
    raw = httpx.post(server.url + "/v1/embeddings", json={"input": TEXTS, "encoding_format": "base64"}).json()
    assert np.allclose([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in raw["data"]], want, atol=1e-6)
    assert floats.usage.prompt_tokens == sum(len(server.engine.text.encode(t)) for t in TEXTS) and b64.data


@pytest.mark.parametrize("path,body,status,code", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "wrong_endpoint"),
    ("/v1/completions", {"prompt": "hi"}, 400, "wrong_endpoint"),
    ("/v1/embeddings", {"input": "hi", "model": "other"}, 404, "model_not_found"),
    ("/v1/embeddings", {"input": "hi", "dimensions": 8}, 400, None),
    ("/v1/embeddings", {"input": [[1, 99999]]}, 400, None),
    ("/v1/embeddings", {"input": []}, 400, None),
])
def test_refusals(server, path, body, status, code):
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
