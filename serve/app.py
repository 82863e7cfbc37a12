"""The Ray Serve application: one deployment per stage model, and an OpenAI-compatible ingress.

    GET  /v1/models             the stages this run has (base, sft, rlhf)
    POST /v1/chat/completions   chat; SSE `chat.completion.chunk`s ending in `data: [DONE]` when
                                stream is true
    POST /v1/completions        plain text continuation (the base model's natural interface)
    POST /v1/score              the reward model's score of a conversation, or of candidate replies
    GET  /                      the chat page (serve/page.html)
    GET  /health, /ready

The ingress routes by the request's `model` field to that stage's deployment, whose replicas each
run a vLLM engine (`serve/engine.py`). Every bad request gets OpenAI's error JSON with a 4xx code;
nothing a client sends can take a replica down.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from rlhf_ray.cluster import ACTOR_ENV
from rlhf_ray.config import ServeConfig
from serve.protocol import (
    Body,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    ScoreRequest,
    error_body,
    new_id,
    now,
)

CHAT_STAGES = ("base", "sft", "rlhf")
PAGE = Path(__file__).with_name("page.html")

api = FastAPI(title="rlhf-ray", docs_url=None, redoc_url=None)


@serve.deployment
class RewardModel:
    """The reward model: one score per conversation (its last turn the assistant's)."""

    def __init__(self, folder: str) -> None:
        from rlhf_ray.modeling import load_scalar_model
        from rlhf_ray.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(Path(folder))
        self.model = load_scalar_model(Path(folder)).eval()
        self.max_len = self.model.config.max_position_embeddings

    def score(self, conversations: list[list[dict[str, str]]]) -> list[float] | dict:
        import torch

        from rlhf_ray.data.records import Message

        rendered = [self.tokenizer.render_chat([Message(**m) for m in c])[0] for c in conversations]
        longest = max(len(ids) for ids in rendered)
        if longest > self.max_len:
            return {"error": f"a conversation is {longest} tokens; the reward model's context is "
                             f"{self.max_len}", "param": "messages"}
        pad = self.tokenizer.pad_id
        ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rendered])
        mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rendered])
        with torch.no_grad():
            return self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()


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
    def __init__(self, stages: dict[str, DeploymentHandle], reward: DeploymentHandle | None,
                 api_key: str | None, max_body_bytes: int) -> None:
        self.stages, self.reward = stages, reward
        self.api_key, self.max_body_bytes = api_key, max_body_bytes

    def refuse(self, request: Request) -> JSONResponse | None:
        """The answer to a request without the API key (when one is set); None lets it through."""
        if self.api_key is None:
            return None
        if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                         code="invalid_api_key")
        return None

    async def parse(self, request: Request, kind: type[Body], models: list[str]) -> Any:
        """The validated body, or the error response that answers it."""
        if (refused := self.refuse(request)) is not None:
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
        if parsed.model not in models:
            return error(404, f"model {parsed.model!r} does not exist here; this route serves "
                         f"{models}", param="model", code="model_not_found")
        return parsed

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        if (refused := self.refuse(request)) is not None:
            return refused
        ids = list(self.stages) + (["reward"] if self.reward is not None else [])
        return {"object": "list", "data": [
            {"id": model, "object": "model", "created": now(), "owned_by": "rlhf-ray"}
            for model in ids]}

    @api.post("/v1/score")
    async def score(self, request: Request) -> Any:
        parsed = await self.parse(request, ScoreRequest, ["reward"] if self.reward else [])
        if isinstance(parsed, JSONResponse):
            return parsed
        messages = [m.model_dump(include={"role", "content"}) for m in parsed.messages]
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
        return {"object": "score", "model": "reward", "scores": scores, "ranking": ranking}

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> str:
        """The chat page: pick a stage and chat, or compare base/sft/rlhf with the RM's scores."""
        return PAGE.read_text(encoding="utf-8")

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self) -> dict:
        return {"status": "ready",
                "models": sorted(self.stages) + (["reward"] if self.reward is not None else [])}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        parsed = await self.parse(request, ChatCompletionRequest, list(self.stages))
        return parsed if isinstance(parsed, JSONResponse) else await self.complete(parsed, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        parsed = await self.parse(request, CompletionRequest, list(self.stages))
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
    reward_dir = Path(run_dir) / "reward"
    reward = (RewardModel.options(name="reward", ray_actor_options={
        "num_cpus": cfg.cpus_per_replica, "runtime_env": ACTOR_ENV}).bind(str(reward_dir))
        if "reward" in cfg.stages and (reward_dir / "config.json").is_file() else None)
    api_key = None
    if cfg.api_key_env is not None:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise ValueError(f"serve.api_key_env is {cfg.api_key_env!r}, but that environment "
                             "variable is not set (or empty)")
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(
        handles, reward, api_key, cfg.max_body_bytes)


def app_builder(args: dict[str, str]) -> serve.Application:
    """The app of the run folder `args["run"]` (serve/serve_config.yaml's import_path)."""
    from rlhf_ray.config import load_config

    run_dir = Path(args["run"])
    return build_app(run_dir, load_config(run_dir / "config.yaml").serve)
