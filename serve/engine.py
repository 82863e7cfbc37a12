"""One stage's model behind vLLM's AsyncLLM: renders requests to token ids and streams replies.

Chat stages (sft, rlhf) render a conversation with the run's chat template; the base model gets
the same conversation as a plain document (the turns' texts, one per line) and continues it, which
is what a base model does. Prompts are rendered with our tokenizer, not by vLLM: transformers'
tokenizers would turn special-token text typed by a user into control tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from rlhf_ray.config import KVCacheConfig
from rlhf_ray.data.records import Message
from rlhf_ray.memory import check_kv_fits, vllm_memory_args
from rlhf_ray.modeling import model_max_len
from rlhf_ray.prompting import prompt_ids
from rlhf_ray.run import serves_as
from rlhf_ray.tokenizer import load_tokenizer
from serve.protocol import ChatCompletionRequest, CompletionRequest, Delta, SamplingFields


class RequestError(ValueError):
    """A request this model cannot serve (e.g. longer than its context); answered with a 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class StageEngine:
    def __init__(self, stage: str, folder: Path, sequences: int,
                 kv_cache: KVCacheConfig | None = None) -> None:
        """`sequences`: what the replica works on at once (serve.max_ongoing_requests), each up
        to the model's context; the KV cache is sized for them (rlhf_ray/memory.py)."""
        self.stage, self.folder = stage, Path(folder)
        self.tokenizer = load_tokenizer(self.folder)
        self.max_len = model_max_len(self.folder)
        # bf16 on GPUs; float32 on a CPU, where the evaluation in metrics/eval.json ran too.
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        memory = vllm_memory_args(self.folder, kv_cache or KVCacheConfig(), sequences, dtype)
        if "kv_cache_memory_bytes" in memory and not torch.cuda.is_available():
            check_kv_fits(f"serve replica of {stage!r}", int(memory["kv_cache_memory_bytes"]))
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(self.folder), dtype=dtype, max_model_len=self.max_len, enforce_eager=True,
            **memory))
        self.aborted = 0  # requests stopped before their end (their client went away)

    def prompt_ids(self, request: ChatCompletionRequest | CompletionRequest) -> list[int]:
        if isinstance(request, CompletionRequest):
            return self.tokenizer.encode_document(request.prompt)
        messages = [Message(role=m.role, content=m.content) for m in request.messages]
        try:
            return prompt_ids(self.tokenizer, serves_as(self.stage), messages)
        except ValueError as e:  # a chat ending with the assistant's turn
            raise RequestError(str(e), "messages") from None

    def sampling_params(self, request: SamplingFields, prompt_tokens: int) -> SamplingParams:
        room = self.max_len - prompt_tokens
        if room < 1:
            raise RequestError(f"the prompt is {prompt_tokens} tokens; model {self.stage!r} has a "
                               f"context of {self.max_len} tokens", "messages")
        if request.max_tokens is not None and request.max_tokens > room:
            raise RequestError(f"max_tokens {request.max_tokens} + the prompt's {prompt_tokens} "
                               f"tokens exceed the context of {self.max_len}", "max_tokens")
        return SamplingParams(
            n=request.n, temperature=request.temperature, top_p=request.top_p,
            max_tokens=request.max_tokens or room, stop=request.stop or None,
            stop_token_ids=list(self.tokenizer.stop_ids), seed=request.seed,
            output_kind=RequestOutputKind.DELTA, skip_special_tokens=True)

    async def generate(self, request: ChatCompletionRequest | CompletionRequest,
                       request_id: str) -> AsyncIterator[Delta]:
        """The reply's pieces as they come; stopping early (a client gone) aborts the request."""
        ids = self.prompt_ids(request)
        params = self.sampling_params(request, len(ids))
        counts = [0] * request.n
        finished = False
        try:
            async for output in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                     request_id):
                for choice in output.outputs:
                    counts[choice.index] += len(choice.token_ids)
                    yield Delta(choice.index, choice.text, choice.finish_reason, len(ids),
                                counts[choice.index])
            finished = True
        finally:
            if not finished:
                await self.engine.abort(request_id)
                self.aborted += 1

    def stats(self) -> dict[str, int]:
        """Requests the engine is working on now, and those aborted so far."""
        return {"running": self.engine.get_num_unfinished_requests(), "aborted": self.aborted}

    def shutdown(self) -> None:
        self.engine.shutdown()


async def batched(deltas: AsyncIterator[Delta], interval_s: float) -> AsyncIterator[list[Delta]]:
    """The stream's deltas in lists: at once until some text has gone (the time to first token
    is not delayed), then what arrived in each `interval_s`.

    Each list crosses Ray twice (replica -> ingress -> HTTP proxy); on a CPU one crossing costs
    about as much as a token of a small model, so sending every token alone would halve the
    server's throughput. Closing this generator early cancels the stream (and so aborts it)."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump() -> None:
        try:
            async for delta in deltas:
                queue.put_nowait(delta)
            queue.put_nowait(end)
        except Exception as e:  # handed over to be raised in the consumer
            queue.put_nowait(e)

    task = asyncio.create_task(pump())
    loop = asyncio.get_running_loop()
    try:
        item = await queue.get()
        deadline, eager = loop.time(), True
        while item is not end:
            batch = []
            while item is not end and not isinstance(item, Exception):
                batch.append(item)
                if queue.qsize():
                    item = queue.get_nowait()
                    continue
                try:
                    item = await asyncio.wait_for(queue.get(), deadline - loop.time())
                except TimeoutError:
                    item = None
                    break
            if batch:
                yield batch
                eager = eager and not any(d.text or d.finish_reason for d in batch)
            if isinstance(item, Exception):
                raise item
            deadline = loop.time() + (0 if eager else interval_s)
            if item is None:
                item = await queue.get()
    finally:
        task.cancel()
