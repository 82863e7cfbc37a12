"""The Ray Serve application: one deployment per stage model, and an OpenAI-compatible ingress.

    GET  /v1/models             the stages this run has (base, sft, rlhf)
    POST /v1/chat/completions   chat; SSE `chat.completion.chunk`s ending in `data: [DONE]` when
                                stream is true
    POST /v1/completions        plain text continuation (the base model's natural interface)
    GET  /health, /ready

The ingress routes by the request's `model` field to that stage's deployment, whose replicas each
run a vLLM engine (`serve/engine.py`). Every bad request gets OpenAI's error JSON with a 4xx code;
nothing a client sends can take a replica down.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from rlhf_ray.cluster import ACTOR_ENV
from rlhf_ray.config import ServeConfig
from serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    error_body,
    new_id,
    now,
)

CHAT_STAGES = ("base", "sft", "rlhf")

api = FastAPI(title="rlhf-ray", docs_url=None, redoc_url=None)


@serve.deployment
class StageModel:
    """One stage's vLLM engine; `generate` streams `Delta`s (serve.engine)."""

    def __init__(self, stage: str, folder: str, memory_fraction: float) -> None:
        from serve.engine import StageEngine  # vLLM is imported in the replica only

        self.engine = StageEngine(stage, Path(folder), memory_fraction)

    async def generate(self, request: SamplingFields, request_id: str) -> AsyncIterator[Any]:
        from serve.engine import RequestError

        try:
            async for delta in self.engine.generate(request, request_id):
                yield delta
        except RequestError as e:  # sent as a value: the ingress turns it into a 400
            yield {"error": str(e), "param": e.param}


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return f"{param}: {first['msg']}" if param else first["msg"], param


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, stages: dict[str, DeploymentHandle]) -> None:
        self.stages = stages

    async def parse(self, request: Request, kind: type[SamplingFields]) -> SamplingFields | JSONResponse:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(400, f"the body is not valid JSON: {e}")
        try:
            parsed = kind.model_validate(body)
        except ValidationError as e:
            message, param = validation_message(e)
            return error(400, message, param=param)
        if parsed.model not in self.stages:
            return error(404, f"model {parsed.model!r} does not exist; this server has "
                         f"{sorted(self.stages)}", param="model", code="model_not_found")
        return parsed

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [
            {"id": stage, "object": "model", "created": now(), "owned_by": "rlhf-ray"}
            for stage in self.stages]}

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self) -> dict:
        return {"status": "ready", "models": sorted(self.stages)}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        parsed = await self.parse(request, ChatCompletionRequest)
        return parsed if isinstance(parsed, JSONResponse) else await self.complete(parsed, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        parsed = await self.parse(request, CompletionRequest)
        return parsed if isinstance(parsed, JSONResponse) else await self.complete(parsed, chat=False)

    async def complete(self, request: SamplingFields, chat: bool) -> Any:
        request_id = new_id("chatcmpl" if chat else "cmpl")
        deltas = self.stages[request.model].options(stream=True).generate.remote(request, request_id)
        first = await deltas.__anext__()  # a request error arrives before any text
        if isinstance(first, dict):
            return error(400, first["error"], param=first["param"])
        if request.stream:
            return StreamingResponse(self.sse(first, deltas, request, request_id, chat),
                                     media_type="text/event-stream")
        texts, finish = [""] * request.n, [None] * request.n
        counts, prompt_tokens = [0] * request.n, first.prompt_tokens
        delta = first
        while True:
            texts[delta.index] += delta.text
            finish[delta.index] = delta.finish_reason or finish[delta.index]
            counts[delta.index] = delta.completion_tokens
            try:
                delta = await deltas.__anext__()
            except StopAsyncIteration:
                break
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts),
                 "total_tokens": prompt_tokens + sum(counts)}
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "finish_reason": finish[i], "logprobs": None} for i in range(request.n)]
            kind = "chat.completion"
        else:
            choices = [{"index": i, "text": texts[i], "finish_reason": finish[i], "logprobs": None}
                       for i in range(request.n)]
            kind = "text_completion"
        return {"id": request_id, "object": kind, "created": now(), "model": request.model,
                "choices": choices, "usage": usage}

    async def sse(self, first: Any, deltas: Any, request: SamplingFields, request_id: str,
                  chat: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        created = now()

        def event(choices: list[dict], usage: dict | None = None) -> str:
            chunk = {"id": request_id, "object": kind, "created": created, "model": request.model,
                     "choices": choices}
            if usage is not None:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n"

        if chat:  # OpenAI opens every choice with the role
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "finish_reason": None} for i in range(request.n)])
        counts, prompt_tokens = [0] * request.n, first.prompt_tokens
        delta = first
        while delta is not None:
            counts[delta.index] = delta.completion_tokens
            if delta.text or delta.finish_reason:
                body = ({"delta": {"content": delta.text}} if chat else {"text": delta.text})
                yield event([{"index": delta.index, **body, "finish_reason": delta.finish_reason,
                              "logprobs": None}])
            try:
                delta = await deltas.__anext__()
            except StopAsyncIteration:
                delta = None
        if request.stream_options and request.stream_options.include_usage:
            yield event([], {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts),
                             "total_tokens": prompt_tokens + sum(counts)})
        yield "data: [DONE]\n\n"


def stage_folders(run_dir: Path, cfg: ServeConfig) -> dict[str, Path]:
    """The configured chat stages whose folders exist in the run."""
    return {s: run_dir / s for s in cfg.stages if s in CHAT_STAGES and (run_dir / s / "config.json").is_file()}


def build_app(run_dir: Path, cfg: ServeConfig) -> serve.Application:
    folders = stage_folders(Path(run_dir), cfg)
    if not folders:
        raise FileNotFoundError(f"{run_dir}: no stage model to serve (none of {list(CHAT_STAGES)} "
                                "has a complete folder); run the pipeline first")
    handles = {
        stage: StageModel.options(
            name=f"stage-{stage}",
            ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica,
                               "runtime_env": ACTOR_ENV},
            max_ongoing_requests=cfg.max_ongoing_requests,
            max_queued_requests=cfg.max_queued_requests,
            autoscaling_config={"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                "target_ongoing_requests": cfg.target_ongoing_requests},
        ).bind(stage, str(folder), cfg.vllm_memory_fraction)
        for stage, folder in folders.items()
    }
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(handles)
