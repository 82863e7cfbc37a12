"""OpenAI's routes and how a server answers them.

    GET  /v1/models             the models this server has (the router: the run's stages, base,
                                sft, rlhf, and the reward model; a stage's app: that stage), under
                                direct ingress each chat stage's `base_urls` (serve/direct.py)
    POST /v1/chat/completions   chat; SSE `chat.completion.chunk`s ending in `data: [DONE]` when
                                stream is true
    POST /v1/completions        plain text continuation (the base model's natural interface), of
                                one prompt or several, as text or token ids, with echo and logprobs
    POST /v1/score              the reward model's score of a conversation, or of candidate replies
    POST /tokenize, /detokenize a stage's tokenizer, as vLLM's server has them (`model` optional)
    GET  /tokenizer_info        its tokenizer_config.json and chat template (`?model=` optional)
    GET  /metrics               Prometheus metrics of what this server answered (serve/metrics.py)
    GET  /                      the chat page (serve/page.html)
    GET  /health, /ready        alive; ready once every model here answers (503 until then)

Two servers answer them (serve/app.py assembles both): the chat app's `Router` at `/`, which
checks each request and relays it by its `model` field to that stage's deployment, and each stage
deployment itself, the ingress of its own app at `/<stage>` (serve/deployments.py), which answers
its model's requests in its own process: one Ray hop fewer on the way to the engine. Under
Serve's direct ingress that process also answers at a port of its own, with no proxy before it.

Every bad request gets OpenAI's error JSON with a 4xx code; nothing a client sends can take a
replica down.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve as ray_serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from rlhf_ray.run import REWARD_MODEL
import serve.metrics as serve_metrics
from serve.deployment import deployment_name, stage_app
from serve.direct import published_stage_urls
from serve.metrics import RequestTimer
from serve.protocol import (
    Body,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    ScoreRequest,
    TokenizeRequest,
    error,
    error_body,
    new_id,
    now,
    read_api_key,
    refusal,
    validation_message,
)
from serve.replies import Choices, Delta, merge

PAGE = Path(__file__).with_name("page.html")
READY_WAIT_S = 2.0  # how long /ready waits for each model's replica to answer

# (method, path, the OpenAIServer method that answers it)
ROUTES = [
    ("GET", "/v1/models", "models"),
    ("POST", "/v1/chat/completions", "chat_completions"),
    ("POST", "/v1/completions", "completions"),
    ("POST", "/v1/score", "score"),
    ("POST", "/tokenize", "tokenize"),
    ("POST", "/detokenize", "detokenize"),
    ("GET", "/tokenizer_info", "tokenizer_info"),
    ("GET", "/metrics", "metrics"),
    ("GET", "/", "page"),
    ("GET", "/health", "health"),
    ("GET", "/ready", "ready"),
]


def openai_api() -> FastAPI:
    """The routes, each answered by the OpenAIServer this replica runs."""
    api = FastAPI(title="rlhf-ray", docs_url=None, redoc_url=None)
    for method, path, name in ROUTES:
        api.add_api_route(path, answered_by(name), methods=[method])
    api.add_middleware(CountResponses)
    return api


def answered_by(name: str) -> Any:
    async def route(request: Request) -> Any:
        return await getattr(ray_serve.get_replica_context().servable_object, name)(request)

    route.__name__ = name
    return route


class CountResponses:
    """ASGI middleware counting each response by route and status (a plain ASGI wrapper, so
    streams pass through untouched and a client's disconnect still reaches them)."""

    routes = {path for _, path, _ in ROUTES}

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # Serve puts the app's route prefix (/sft for a stage's app) in root_path.
        path = scope["path"].removeprefix(scope.get("root_path", "").rstrip("/"))
        route = path if path in self.routes else "other"

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                serve_metrics.METRICS.http.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


def unknown_model(model: str | None, models: list[str]) -> JSONResponse:
    return error(404, f"model {model!r} does not exist here; this route serves {models}",
                 param="model", code="model_not_found")


def overloaded(model: str) -> JSONResponse:
    return JSONResponse(
        error_body(f"model {model!r} is overloaded: all its replicas are busy and its queue is "
                   "full; retry shortly", "server_error", code="overloaded"),
        status_code=503, headers={"Retry-After": "1"})


def loading(model: str) -> JSONResponse:
    return JSONResponse(
        error_body(f"model {model!r} is still loading on this replica; retry shortly", "server_error",
                   code="model_loading"),
        status_code=503, headers={"Retry-After": "1"})


async def replies(first: list[Delta], rest: Any) -> AsyncIterator[Delta]:
    """The stage's stream of batches as deltas, each batch joined per choice."""
    for delta in merge(first):
        yield delta
    async for batch in rest:
        for delta in merge(batch):
            yield delta



class Batches(Protocol):
    """A stage's reply to one generation request, as batches of deltas (its first item an error
    dict when the request cannot be served); `cancel` stops the engine's work on it."""

    def __aiter__(self) -> Any: ...
    async def __anext__(self) -> Any: ...
    def cancel(self) -> None: ...


class OpenAIServer:
    """The routes' answers over this server's models. A subclass says how a model is reached:
    `stream` starts a generation, `ask` calls one of the stage deployment's methods (its
    tokenizer's: tokenized, detokenized, tokenizer_config)."""

    def serve_models(self, chat_models: list[str], reward: DeploymentHandle | None,
                     api_key_env: str | None, max_body_bytes: int) -> None:
        self.chat_models, self.reward = chat_models, reward
        # The tokenizer routes' model when a body names none: a run's stages share one tokenizer.
        self.first_stage = chat_models[0]
        self.api_key = read_api_key(api_key_env)
        self.max_body_bytes = max_body_bytes

    def stream(self, model: str, request: SamplingFields, request_id: str) -> Batches:
        raise NotImplementedError

    async def ask(self, model: str, method: str, *args: Any) -> Any:
        raise NotImplementedError

    def loaded(self, model: str) -> bool:
        """Whether this process can answer for `model` now. Through Serve's proxy a request
        reaches only a replica that has finished starting; under direct ingress (HAProxy mode) a
        stage's replica answers HTTP on its own port while its engine still loads."""
        return True

    async def parse(self, request: Request, kind: type[Body], models: list[str],
                    default: str | None = None) -> Any:
        """The validated body, or the error response that answers it; `default` is the model of
        a body that names none (the tokenizer routes')."""
        if (refused := refusal(self.api_key, request)) is not None:
            return refused
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return error(413, f"the body is {declared} bytes; the limit is {self.max_body_bytes}")
        raw = await request.body()
        if len(raw) > self.max_body_bytes:
            return error(413, f"the body is {len(raw)} bytes; the limit is {self.max_body_bytes}")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(400, f"the body is not valid JSON: {e}")
        try:
            parsed = kind.model_validate(body)
        except ValidationError as e:
            message, param = validation_message(e)
            return error(400, message, param=param)
        parsed.model = parsed.model or default
        if parsed.model not in models:
            return unknown_model(parsed.model, models)
        return parsed if self.loaded(parsed.model) else loading(parsed.model)

    def all_models(self) -> list[str]:
        return self.chat_models + ([REWARD_MODEL] if self.reward is not None else [])

    async def models(self, request: Request) -> Any:
        if (refused := refusal(self.api_key, request)) is not None:
            return refused
        # Under direct ingress each chat stage's replicas also answer at ports of their own.
        direct = await published_stage_urls()
        return {"object": "list", "data": [
            {"id": model, "object": "model", "created": now(), "owned_by": "rlhf-ray",
             **({"base_urls": direct[model]} if model in direct else {})}
            for model in self.all_models()]}

    async def score(self, request: Request) -> Any:
        parsed = await self.parse(request, ScoreRequest, [REWARD_MODEL] if self.reward else [])
        if isinstance(parsed, JSONResponse):
            return parsed
        messages = [{"role": m.prompt_role, "content": m.content} for m in parsed.messages]
        if parsed.candidates is None:
            if messages[-1]["role"] != "assistant":
                return error(400, "the last message must be the assistant's reply to score (or "
                             "send candidates)", param="messages")
            conversations = [messages]
        else:
            if messages[-1]["role"] == "assistant":
                return error(400, "with candidates, the last message must be the user's",
                             param="messages")
            conversations = [messages + [{"role": "assistant", "content": c}]
                             for c in parsed.candidates]
        scores = await self.reward.score.remote(conversations)
        if isinstance(scores, dict):
            return error(400, scores["error"], param=scores["param"])
        ranking = sorted(range(len(scores)), key=lambda i: -scores[i])
        return {"object": "score", "model": REWARD_MODEL, "scores": scores, "ranking": ranking}

    async def page(self, request: Request) -> HTMLResponse:
        """The chat page: pick a stage and chat, or compare base/sft/rlhf with the RM's scores."""
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def health(self, request: Request) -> dict:
        return {"status": "ok"}

    async def ready(self, request: Request) -> Any:
        """200 once a replica of every model here answers; until then (a stage's engine still
        loading) a 503 naming the models it waits for, so that a load balancer's readiness
        check sends nothing that would wait on a starting replica."""
        models = sorted(self.chat_models) + ([REWARD_MODEL] if self.reward is not None else [])
        answered = await asyncio.gather(*(self.answers(model) for model in models))
        waiting = [model for model, ok in zip(models, answered) if not ok]
        if waiting:
            return JSONResponse({"status": "starting", "waiting": waiting}, status_code=503,
                                headers={"Retry-After": "1"})
        return {"status": "ready", "models": models}

    async def answers(self, model: str) -> bool:
        """Whether a replica of the model answers within READY_WAIT_S (one still starting does
        not, nor one whose replicas are all busy with their queue full)."""
        try:
            if model == REWARD_MODEL:
                await asyncio.wait_for(self.reward.ready.remote(), READY_WAIT_S)
            else:
                await asyncio.wait_for(self.ask(model, "stats"), READY_WAIT_S)
        except Exception:
            return False
        return True

    async def tokenize(self, request: Request) -> Any:
        return await self.relay(request, TokenizeRequest, "tokenized")

    async def detokenize(self, request: Request) -> Any:
        return await self.relay(request, DetokenizeRequest, "detokenized")

    async def tokenizer_info(self, request: Request) -> Any:
        if (refused := refusal(self.api_key, request)) is not None:
            return refused
        model = request.query_params.get("model") or self.first_stage
        if model not in self.chat_models:
            return unknown_model(model, self.chat_models)
        if not self.loaded(model):
            return loading(model)
        return await self.ask(model, "tokenizer_config")

    async def relay(self, request: Request, kind: type[TokenizeRequest | DetokenizeRequest],
                    method: str) -> Any:
        """A request a stage answers in one reply (its tokenizer's routes); without a `model`,
        the first stage answers (a run's stages share their tokenizer)."""
        parsed = await self.parse(request, kind, self.chat_models, self.first_stage)
        if isinstance(parsed, JSONResponse):
            return parsed
        try:
            reply = await self.ask(parsed.model, method, parsed)
        except BackPressureError:
            return overloaded(parsed.model)
        return error(400, reply["error"], param=reply["param"]) if "error" in reply else reply

    async def metrics(self, request: Request) -> Response:
        if (refused := refusal(self.api_key, request)) is not None:
            return refused
        content, media_type = serve_metrics.METRICS.render()
        return Response(content, media_type=media_type)

    async def chat_completions(self, request: Request) -> Any:
        parsed = await self.parse(request, ChatCompletionRequest, self.chat_models)
        return parsed if isinstance(parsed, JSONResponse) else await self.complete(parsed, chat=True)

    async def completions(self, request: Request) -> Any:
        parsed = await self.parse(request, CompletionRequest, self.chat_models)
        return parsed if isinstance(parsed, JSONResponse) else await self.complete(parsed, chat=False)

    async def complete(self, request: SamplingFields, chat: bool) -> Any:
        request_id = new_id("chatcmpl" if chat else "cmpl")
        timer = RequestTimer(serve_metrics.METRICS, request.model)
        deltas = self.stream(request.model, request, request_id)
        try:
            first = await deltas.__anext__()  # a request error arrives before any text
        except BackPressureError:
            timer.abandon()
            return overloaded(request.model)
        if isinstance(first, dict):
            timer.abandon()
            return error(400, first["error"], param=first["param"])
        choices = Choices(request.n, chat, logprobs=request.top_logprobs_asked is not None)
        if request.stream:
            return StreamingResponse(self.sse(first, deltas, request, request_id, choices, timer),
                                     media_type="text/event-stream")
        try:
            async for delta in replies(first, deltas):
                choices.add(delta)
                if delta.text:
                    timer.text()
        except BaseException:
            timer.abandon()
            raise
        usage = choices.usage()
        timer.end(usage["prompt_tokens"], usage["completion_tokens"])
        body = {"id": request_id, "object": "chat.completion" if chat else "text_completion",
                "created": now(), "model": request.model, "choices": choices.whole(),
                "usage": usage}
        if request.service_tier is not None:
            body["service_tier"] = "default"
        return body

    async def sse(self, first: list[Delta], deltas: Batches, request: SamplingFields,
                  request_id: str, choices: Choices, timer: RequestTimer) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if choices.chat else "text_completion"
        created = now()

        def event(shown: list[dict], usage: dict | None = None) -> str:
            chunk = {"id": request_id, "object": kind, "created": created, "model": request.model,
                     "choices": shown}
            if usage is not None:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n"

        if choices.chat:  # OpenAI opens every choice with the role
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None} for i in range(request.n)])
        finished = False
        try:
            async for delta in replies(first, deltas):
                shown = choices.add(delta)
                if shown is not None:
                    if delta.text:
                        timer.text()
                    yield event([shown])
            finished = True
        finally:
            if not finished:  # the client went away: stop the engine's work on it
                deltas.cancel()
                timer.abandon()
        usage = choices.usage()
        timer.end(usage["prompt_tokens"], usage["completion_tokens"])
        if request.stream_options and request.stream_options.include_usage:
            yield event([], usage)
        yield "data: [DONE]\n\n"


# Router is pickled as it is defined (ray_serve.ingress wraps it), so what it uses is defined above.
@ray_serve.deployment
@ray_serve.ingress(openai_api())
class Router(OpenAIServer):
    """The chat app's ingress at `/`: every stage of the run, each request relayed by its `model`
    to that stage's deployment (in the stage's own app), the reward model's scores beside them."""

    def __init__(self, stages: list[str], reward: DeploymentHandle | None,
                 api_key_env: str | None, max_body_bytes: int) -> None:
        self.serve_models(stages, reward, api_key_env, max_body_bytes)
        # Not checked now: the stages' apps are deployed together with this one, in any order.
        self.stages = {stage: ray_serve.get_deployment_handle(
            deployment_name(stage), stage_app(stage).name, _check_exists=False) for stage in stages}

    def stream(self, model: str, request: SamplingFields, request_id: str) -> Batches:
        return self.stages[model].options(stream=True).generate.remote(request, request_id)

    async def ask(self, model: str, method: str, *args: Any) -> Any:
        return await getattr(self.stages[model], method).remote(*args)
