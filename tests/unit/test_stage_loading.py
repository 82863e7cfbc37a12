"""A stage's replica asked before its engine has loaded says so: a 503 with Retry-After, not a
500 from the missing engine. Through Serve's proxy no request reaches a replica that is still
starting, but under Serve's direct ingress (HAProxy mode, `cluster.serve_ingress: haproxy`) each
replica answers HTTP on its own port from the moment its constructor returns, and the engine
loads after that, in `reconfigure` (bench/RESULTS.md, 2026-12-06: chat requests there got 500s)."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import Request

from serve.deployments import StageModel


def http_request(method: str, path: str, body: dict | None = None, query: str = "") -> Request:
    raw = json.dumps(body).encode() if body is not None else b""

    async def receive() -> dict:
        return {"type": "http.request", "body": raw, "more_body": False}

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    return Request({"type": "http", "method": method, "path": path, "headers": headers,
                    "query_string": query.encode()}, receive)


@pytest.fixture
def starting_stage() -> StageModel:
    """The sft stage's replica object as Serve has it between its constructor and reconfigure
    (its own constructor: the class under Serve's ASGI wrapper, whose async one sets up FastAPI)."""
    wrapper = StageModel.func_or_class
    stage = wrapper.__new__(wrapper)
    super(wrapper, stage).__init__("sft", 4, {}, 1.0, 0.05, None, 1 << 20)
    return stage


@pytest.mark.parametrize("route, request_", [
    ("chat_completions", http_request("POST", "/v1/chat/completions",
                                      {"model": "sft", "messages": [{"role": "user", "content": "Hi"}]})),
    ("completions", http_request("POST", "/v1/completions", {"model": "sft", "prompt": "Hi"})),
    ("tokenize", http_request("POST", "/tokenize", {"prompt": "Hi"})),
    ("detokenize", http_request("POST", "/detokenize", {"tokens": [1, 2]})),
    ("tokenizer_info", http_request("GET", "/tokenizer_info")),
])
def test_a_stage_still_loading_its_engine_answers_503_with_retry_after(starting_stage, route, request_):
    response = asyncio.run(getattr(starting_stage, route)(request_))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    error = json.loads(response.body)["error"]
    assert error["code"] == "model_loading" and "'sft' is still loading" in error["message"]


def test_a_bad_request_to_a_loading_stage_still_gets_its_own_error(starting_stage):
    """What is wrong with the request is said first: loading or not, it would not be served."""
    wrong_model = http_request("POST", "/v1/chat/completions",
                               {"model": "rlhf", "messages": [{"role": "user", "content": "Hi"}]})
    assert asyncio.run(starting_stage.chat_completions(wrong_model)).status_code == 404
    no_messages = http_request("POST", "/v1/chat/completions", {"model": "sft"})
    assert asyncio.run(starting_stage.chat_completions(no_messages)).status_code == 400
