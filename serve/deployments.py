"""The models' deployments: one per chat stage (its replicas each run a vLLM engine,
serve/engine.py), which is also the ingress of that stage's own app, and one for the reward
model. Each takes its model folder from its user_config, so pointing it at another folder swaps
the model in place."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve as ray_serve

from rlhf_ray.config import KVCacheConfig
from serve.ingress import Batches, OpenAIServer, openai_api
from serve.protocol import DetokenizeRequest, SamplingFields, TokenizeRequest


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

    def ready(self) -> bool:
        return self.loaded is not None

    def score(self, conversations: list[list[dict[str, str]]]) -> list[float] | dict:
        from rlhf_ray.data.records import Message
        from rlhf_ray.modeling import score_conversations

        tokenizer, model, _ = self.loaded  # one model for the whole call, even mid-swap
        try:
            return score_conversations(model, tokenizer, [[Message(**m) for m in c]
                                                          for c in conversations])
        except ValueError as e:  # too long for the model's context
            return {"error": str(e), "param": "messages"}


class InProcess:
    """A generation streamed in this process, as a streaming handle's reply would come."""

    def __init__(self, batches: AsyncIterator[Any]) -> None:
        self.batches = batches
        self.closing: asyncio.Task | None = None

    def __aiter__(self) -> InProcess:
        return self

    async def __anext__(self) -> Any:
        return await self.batches.__anext__()

    def cancel(self) -> None:
        self.closing = asyncio.get_running_loop().create_task(self.batches.aclose())


# StageModel is pickled as it is defined (ray_serve.ingress wraps it), so what it uses is above.
@ray_serve.deployment
@ray_serve.ingress(openai_api())
class StageModel(OpenAIServer):
    """One stage's vLLM engine. The router streams from `generate` (lists of `Delta`s,
    serve.engine.batched); as the ingress of the stage's own app it answers the OpenAI routes
    for its model in this process, with no hop between the HTTP proxy and the engine.

    The folder comes in the user_config. Pointing the deployment at another folder (or the same
    folder rewritten) loads a second engine next to the first; new requests go to the new one,
    and the old one finishes its in-flight requests (up to `drain_s`) before it shuts down.
    """

    def __init__(self, stage: str, sequences: int, kv_cache: dict[str, Any], drain_s: float,
                 stream_interval_s: float, api_key_env: str | None, max_body_bytes: int) -> None:
        self.serve_models([stage], None, api_key_env, max_body_bytes)
        self.stage, self.sequences, self.drain_s = stage, sequences, drain_s
        self.kv_cache = KVCacheConfig.model_validate(kv_cache)
        self.stream_interval_s = stream_interval_s
        self.engine: Any = None
        self.folder_key: tuple | None = None
        self.draining: set[asyncio.Task] = set()
        self.reloads = 0

    async def reconfigure(self, config: dict[str, Any]) -> None:
        key = (config["folder"], config.get("state"))
        if key == self.folder_key:
            return
        new = await asyncio.to_thread(self.start_engine, Path(config["folder"]))
        old, self.engine, self.folder_key = self.engine, new, key
        if old is not None:
            self.reloads += 1
            task = asyncio.create_task(self.retire(old))
            self.draining.add(task)
            task.add_done_callback(self.draining.discard)

    def start_engine(self, folder: Path) -> Any:
        """A vLLM engine on `folder`, its workers on cores that the node's other Ray and Serve
        processes then leave to them (serve/cpus.py)."""
        from serve.cpus import all_node_cores, keep_off_worker_cores, worker_cores
        from serve.engine import StageEngine  # vLLM is imported in the replica only

        with all_node_cores():
            engine = StageEngine(self.stage, folder, self.sequences, self.kv_cache)
            busy = worker_cores(engine.engine.vllm_config)
        keep_off_worker_cores(busy)
        return engine

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

    def stream(self, model: str, request: SamplingFields, request_id: str) -> Batches:
        return InProcess(self.generate(request, request_id))

    def loaded(self, model: str) -> bool:
        return self.engine is not None

    async def ask(self, model: str, method: str, *args: Any) -> Any:
        return getattr(self, method)(*args)

    async def generate(self, request: SamplingFields, request_id: str) -> AsyncIterator[Any]:
        from serve.engine import RequestError, batched

        try:
            async for batch in batched(self.engine.generate(request, request_id),
                                       self.stream_interval_s):
                yield batch
        except RequestError as e:  # sent as a value: the ingress turns it into a 400
            yield {"error": str(e), "param": e.param}

    # The tokenizer routes' replies (named apart from the routes, which OpenAIServer answers).
    def tokenized(self, request: TokenizeRequest) -> dict[str, Any]:
        return self.tokenizer_reply(self.engine.tokenize, request)

    def detokenized(self, request: DetokenizeRequest) -> dict[str, Any]:
        return self.tokenizer_reply(self.engine.detokenize, request)

    def tokenizer_config(self) -> dict[str, Any]:
        return self.engine.tokenizer_info()

    @staticmethod
    def tokenizer_reply(route: Any, request: Any) -> dict[str, Any]:
        from serve.engine import RequestError

        try:
            return route(request)
        except RequestError as e:  # sent as a value: the ingress turns it into a 400
            return {"error": str(e), "param": e.param}

    def stats(self) -> dict[str, Any]:
        """This replica, the folder it serves, and its engine's running and aborted requests."""
        return {**self.engine.stats(), "folder": self.folder_key[0], "reloads": self.reloads,
                "retiring": len(self.draining),
                "replica": ray_serve.get_replica_context().replica_id.unique_id}
