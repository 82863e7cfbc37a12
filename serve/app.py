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

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve as ray_serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from rlhf_ray.cluster import ACTOR_ENV
from rlhf_ray.config import KVCacheConfig, ServeConfig
from rlhf_ray.run import CHAT_MODELS, REWARD_MODEL, RunFolder
from serve.protocol import (
    Body,
    ChatCompletionRequest,
    CompletionRequest,
    Delta,
    SamplingFields,
    ScoreRequest,
    error_body,
    merge,
    new_id,
    now,
)

CHAT_STAGES = CHAT_MODELS  # the stages vLLM replicas serve (rlhf_ray/run.py)
PAGE = Path(__file__).with_name("page.html")
# The ingress only relays; the stage deployments' own limits (serve.max_ongoing_requests and
# serve.max_queued_requests) decide what is served, queued or answered 503.
INGRESS_MAX_ONGOING = 4096

api = FastAPI(title="rlhf-ray", docs_url=None, redoc_url=None)


@ray_serve.deployment
class RewardModel:
    """The reward model: one score per conversation (its last turn the assistant's). Its folder
    comes in the user_config, so pointing it at another folder swaps the model in place."""

    def __init__(self) -> None:
        self.loaded: tuple[Any, Any, int] | None = None  # tokenizer, model, context length
        self.folder_key: tuple | None = None

    async def reconfigure(self, config: dict[str, Any]) -> None:
        key = (config["folder"], config.get("state"))
        if key != self.folder_key:
            self.loaded = await asyncio.to_thread(self.load, Path(config["folder"]))
            self.folder_key = key

    @staticmethod
    def load(folder: Path) -> tuple[Any, Any, int]:
        from rlhf_ray.modeling import load_scalar_model
        from rlhf_ray.tokenizer import load_tokenizer

        model = load_scalar_model(folder).eval()
        return load_tokenizer(folder), model, model.config.max_position_embeddings

    def score(self, conversations: list[list[dict[str, str]]]) -> list[float] | dict:
        from rlhf_ray.data.records import Message
        from rlhf_ray.modeling import score_conversations

        tokenizer, model, _ = self.loaded  # one model for the whole call, even mid-swap
        try:
            return score_conversations(model, tokenizer, [[Message(**m) for m in c]
                                                          for c in conversations])
        except ValueError as e:  # too long for the model's context
            return {"error": str(e), "param": "messages"}


@ray_serve.deployment
class StageModel:
    """One stage's vLLM engine; `generate` streams lists of `Delta`s (serve.engine.batched).

    The folder comes in the user_config. Pointing the deployment at another folder (or the same
    folder rewritten) loads a second engine next to the first; new requests go to the new one,
    and the old one finishes its in-flight requests (up to `drain_s`) before it shuts down.
    """

    def __init__(self, stage: str, sequences: int, kv_cache: dict[str, Any], drain_s: float,
                 stream_interval_s: float) -> None:
        self.stage, self.sequences, self.drain_s = stage, sequences, drain_s
        self.kv_cache = KVCacheConfig.model_validate(kv_cache)
        self.stream_interval_s = stream_interval_s
        self.engine: Any = None
        self.folder_key: tuple | None = None
        self.draining: set[asyncio.Task] = set()
        self.reloads = 0

    async def reconfigure(self, config: dict[str, Any]) -> None:
        from serve.engine import StageEngine  # vLLM is imported in the replica only

        key = (config["folder"], config.get("state"))
        if key == self.folder_key:
            return
        new = await asyncio.to_thread(StageEngine, self.stage, Path(config["folder"]),
                                      self.sequences, self.kv_cache)
        old, self.engine, self.folder_key = self.engine, new, key
        if old is not None:
            self.reloads += 1
            task = asyncio.create_task(self.retire(old))
            self.draining.add(task)
            task.add_done_callback(self.draining.discard)

    async def retire(self, old: Any) -> None:
        """Shut an engine down once its in-flight requests are done (or after drain_s)."""
        deadline = time.monotonic() + self.drain_s
        while old.stats()["running"] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.to_thread(old.shutdown)

    def __del__(self) -> None:
        """Serve calls this as it stops the replica: the engines' processes go with it."""
        for task in list(getattr(self, "draining", ())):
            task.cancel()
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()

    async def generate(self, request: SamplingFields, request_id: str) -> AsyncIterator[Any]:
        from serve.engine import RequestError, batched

        try:
            async for batch in batched(self.engine.generate(request, request_id),
                                       self.stream_interval_s):
                yield batch
        except RequestError as e:  # sent as a value: the ingress turns it into a 400
            yield {"error": str(e), "param": e.param}

    def stats(self) -> dict[str, Any]:
        """This replica, the folder it serves, and its engine's running and aborted requests."""
        return {**self.engine.stats(), "folder": self.folder_key[0], "reloads": self.reloads,
                "retiring": len(self.draining),
                "replica": ray_serve.get_replica_context().replica_id.unique_id}


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return f"{param}: {first['msg']}" if param else first["msg"], param


def read_api_key(env: str | None) -> str | None:
    """The key in environment variable `env` (None: no key is required)."""
    if env is None:
        return None
    if not os.environ.get(env):
        raise ValueError(f"serve.api_key_env is {env!r}, but that environment variable is not "
                         "set (or empty)")
    return os.environ[env]


async def replies(first: list[Delta], rest: Any) -> AsyncIterator[Delta]:
    """The stage's stream of batches as deltas, each batch joined per choice."""
    for delta in merge(first):
        yield delta
    async for batch in rest:
        for delta in merge(batch):
            yield delta


# Ingress is pickled as it is defined (ray_serve.ingress wraps it), so what it uses is defined above.
@ray_serve.deployment
@ray_serve.ingress(api)
class Ingress:
    def __init__(self, stages: dict[str, DeploymentHandle], reward: DeploymentHandle | None,
                 api_key_env: str | None, max_body_bytes: int) -> None:
        self.stages, self.reward = stages, reward
        self.api_key = read_api_key(api_key_env)
        self.max_body_bytes = max_body_bytes

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
        ids = list(self.stages) + ([REWARD_MODEL] if self.reward is not None else [])
        return {"object": "list", "data": [
            {"id": model, "object": "model", "created": now(), "owned_by": "rlhf-ray"}
            for model in ids]}

    @api.post("/v1/score")
    async def score(self, request: Request) -> Any:
        parsed = await self.parse(request, ScoreRequest, [REWARD_MODEL] if self.reward else [])
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
        return {"object": "score", "model": REWARD_MODEL, "scores": scores, "ranking": ranking}

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
                "models": sorted(self.stages) + ([REWARD_MODEL] if self.reward is not None else [])}

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
        try:
            first = await deltas.__anext__()  # a request error arrives before any text
        except BackPressureError:
            return JSONResponse(
                error_body(f"model {request.model!r} is overloaded: all its replicas are busy and "
                           "its queue is full; retry shortly", "server_error", code="overloaded"),
                status_code=503, headers={"Retry-After": "1"})
        if isinstance(first, dict):
            return error(400, first["error"], param=first["param"])
        if request.stream:
            return StreamingResponse(self.sse(first, deltas, request, request_id, chat),
                                     media_type="text/event-stream")
        texts, finish = [""] * request.n, [None] * request.n
        counts, prompt_tokens = [0] * request.n, first[0].prompt_tokens
        async for delta in replies(first, deltas):
            texts[delta.index] += delta.text
            finish[delta.index] = delta.finish_reason or finish[delta.index]
            counts[delta.index] = delta.completion_tokens
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

    async def sse(self, first: list[Delta], deltas: Any, request: SamplingFields,
                  request_id: str, chat: bool) -> AsyncIterator[str]:
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
        counts, prompt_tokens = [0] * request.n, first[0].prompt_tokens
        finished = False
        try:
            async for delta in replies(first, deltas):
                counts[delta.index] = delta.completion_tokens
                if delta.text or delta.finish_reason:
                    body = ({"delta": {"content": delta.text}} if chat else {"text": delta.text})
                    yield event([{"index": delta.index, **body,
                                  "finish_reason": delta.finish_reason, "logprobs": None}])
            finished = True
        finally:
            if not finished:  # the client went away: stop the engine's work on it
                deltas.cancel()
        if request.stream_options and request.stream_options.include_usage:
            yield event([], {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts),
                             "total_tokens": prompt_tokens + sum(counts)})
        yield "data: [DONE]\n\n"


def stage_folders(run_dir: Path, cfg: ServeConfig) -> dict[str, Path]:
    """The configured stages (chat stages and the reward model) with a complete model folder:
    the run's own, or the one `serve.folders` names."""
    run = RunFolder(Path(run_dir))
    folders = {stage: Path(cfg.folders.get(stage, run.model(stage))) for stage in cfg.stages}
    return {stage: folder for stage, folder in folders.items() if (folder / "config.json").is_file()}


def folder_config(folder: Path) -> dict[str, str]:
    """A deployment's user_config: the folder, and a digest of its files' sizes and times, so a
    new export into the same folder is a new config (Serve then reconfigures the replicas)."""
    import hashlib

    if not folder.is_dir():
        return {"folder": str(folder.resolve())}
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns)
             for f in sorted(folder.iterdir()) if f.is_file()]
    return {"folder": str(folder.resolve()), "state": hashlib.sha256(repr(files).encode()).hexdigest()[:16]}


def deployment_name(stage: str) -> str:
    return REWARD_MODEL if stage == REWARD_MODEL else f"stage-{stage}"


def build_app(run_dir: Path, cfg: ServeConfig, stages: list[str] | None = None) -> ray_serve.Application:
    """The application of `run_dir`'s stage folders; each folder is its deployment's user_config.

    `stages` fixes which deployments exist (default: the stages whose folders are there); the
    deployer may then point any of them at another folder by overriding its user_config alone,
    which Serve applies in place."""
    found = stage_folders(Path(run_dir), cfg)
    run = RunFolder(Path(run_dir))
    folders = found if stages is None else {s: found.get(s, run.model(s)) for s in stages}
    if not any(stage in CHAT_STAGES for stage in folders):
        raise FileNotFoundError(f"{run_dir}: no stage model to serve (none of {list(CHAT_STAGES)} "
                                "has a complete folder); run the pipeline first")
    read_api_key(cfg.api_key_env)  # refuse here, with the reason, rather than in a replica
    replica_options = {"num_cpus": cfg.cpus_per_replica, "runtime_env": ACTOR_ENV}
    handles = {
        stage: StageModel.options(
            name=deployment_name(stage), user_config=folder_config(folder),
            ray_actor_options={**replica_options, "num_gpus": cfg.gpus_per_replica},
            max_ongoing_requests=cfg.max_ongoing_requests,
            max_queued_requests=cfg.max_queued_requests,
            graceful_shutdown_timeout_s=cfg.drain_timeout_s,
            autoscaling_config={"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                "target_ongoing_requests": cfg.target_ongoing_requests},
        ).bind(stage, cfg.max_ongoing_requests, cfg.kv_cache.model_dump(), cfg.drain_timeout_s,
               cfg.stream_interval_ms / 1000)
        for stage, folder in folders.items() if stage in CHAT_STAGES
    }
    reward = None
    if REWARD_MODEL in folders:
        reward = RewardModel.options(
            name=deployment_name(REWARD_MODEL), user_config=folder_config(folders[REWARD_MODEL]),
            ray_actor_options=replica_options, graceful_shutdown_timeout_s=cfg.drain_timeout_s,
        ).bind()
    return Ingress.options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=INGRESS_MAX_ONGOING,
        graceful_shutdown_timeout_s=cfg.drain_timeout_s,
    ).bind(handles, reward, cfg.api_key_env, cfg.max_body_bytes)


def app_builder(args: dict[str, Any]) -> ray_serve.Application:
    """The app of the run folder `args["run"]` (serve/serve_config.yaml's import_path).

    The serve settings are `args["serve"]` when given (rlhf-ray serve passes them), otherwise
    the run's config.yaml's; `args["stages"]` fixes the deployments to make (see build_app)."""
    from rlhf_ray.config import load_config

    run_dir = Path(args["run"])
    if "serve" in args:
        cfg = ServeConfig.model_validate(args["serve"])
    else:
        cfg = load_config(RunFolder(run_dir).config).serve
    return build_app(run_dir, cfg, args.get("stages"))
