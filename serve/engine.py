"""One stage's model behind vLLM's AsyncLLM: renders requests to token ids and streams replies.

Chat stages (sft, rlhf) render a conversation with the run's chat template; the base model gets
the same conversation as a plain document (the turns' texts, one per line) and continues it, which
is what a base model does. Prompts are rendered with our tokenizer, not by vLLM: transformers'
tokenizers would turn special-token text typed by a user into control tokens.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.config import StructuredOutputsConfig
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM

from rlhf_ray.cluster import require_cuda
from rlhf_ray.config import KVCacheConfig
from rlhf_ray.data.records import Message
from rlhf_ray.memory import check_kv_fits, vllm_memory_args
from rlhf_ray.modeling import inspect_policies_in_vllms_process, model_max_len
from rlhf_ray.prompting import prompt_ids
from rlhf_ray.run import serves_as
from rlhf_ray.tokenizer import load_tokenizer
from serve.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    ResponseFormat,
    TokenizeRequest,
)
from serve.replies import Delta, TokenLogprob, merge

Request = ChatCompletionRequest | CompletionRequest


class RequestError(ValueError):
    """A request this model cannot serve (e.g. longer than its context); answered with a 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def structured_outputs(response_format: ResponseFormat | None) -> StructuredOutputsParams | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=response_format.json_schema.schema_)


def tokenizer_info(folder: Path, max_len: int) -> dict[str, Any]:
    """GET /tokenizer_info's reply, as vLLM's server has it: the folder's tokenizer_config.json
    (special tokens as their text, no file paths), its chat template, and `max_len` (the context
    the engine serves) as model_max_length."""
    config_file, template = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    info = {key: value.get("content", value) if isinstance(value, dict) else value
            for key, value in config.items()
            if key not in ("added_tokens_decoder", "vocab_file", "merges_file")}
    if "chat_template" not in info and template.exists():  # where newer transformers write it
        info["chat_template"] = template.read_text(encoding="utf-8")
    return {**info, "model_max_length": max_len}


class StageEngine:
    def __init__(self, stage: str, folder: Path, sequences: int,
                 kv_cache: KVCacheConfig | None = None) -> None:
        """`sequences`: what the replica works on at once (serve.max_ongoing_requests), each up
        to the model's context; the KV cache is sized for them (rlhf_ray/memory.py)."""
        require_cuda(f"serve replica of {stage!r}")
        self.stage, self.folder = stage, Path(folder)
        self.tokenizer = load_tokenizer(self.folder)
        self.max_len = model_max_len(self.folder)
        # bf16 on GPUs; float32 on a CPU, where the evaluation in metrics/eval.json ran too.
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        memory = vllm_memory_args(self.folder, kv_cache or KVCacheConfig(), sequences, dtype)
        if "kv_cache_memory_bytes" in memory and not torch.cuda.is_available():
            check_kv_fits(f"serve replica of {stage!r}", int(memory["kv_cache_memory_bytes"]))
        inspect_policies_in_vllms_process()
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(self.folder), dtype=dtype, max_model_len=self.max_len, enforce_eager=True,
            # JSON without free whitespace between its tokens: a small model given the choice
            # fills max_tokens with newlines and never closes the object.
            structured_outputs_config=StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=True),
            **memory))
        self.aborted = 0  # requests stopped before their end (their client went away)

    # ------------------------------------------------------------------ prompts

    def chat_ids(self, messages: list[ChatMessage], generation_prompt: bool = True) -> list[int]:
        turns = [Message(role=m.prompt_role, content=m.content) for m in messages]
        if not generation_prompt and serves_as(self.stage) == "chat":
            return self.tokenizer.render_chat(turns)[0]
        try:
            return prompt_ids(self.tokenizer, serves_as(self.stage), turns)
        except ValueError as e:  # a chat ending with the assistant's turn
            raise RequestError(str(e), "messages") from None

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        outside = [i for i in ids if i >= self.tokenizer.vocab_size]
        if outside:
            raise RequestError(f"token id {outside[0]} is outside model {self.stage!r}'s "
                               f"vocabulary of {self.tokenizer.vocab_size}", param)
        return ids

    def prompts(self, request: Request) -> list[list[int]]:
        """Each prompt's token ids: a text prompt is a document (it starts with the document
        token, as in pretraining); token ids are taken as they are."""
        if isinstance(request, ChatCompletionRequest):
            return [self.chat_ids(request.messages)]
        return [self.tokenizer.encode_document(p) if isinstance(p, str)
                else self.check_ids(p, "prompt") for p in request.prompts]

    # ------------------------------------------------------------------ sampling

    def sampling_params(self, request: Request, prompt_tokens: int) -> SamplingParams:
        room = self.max_len - prompt_tokens
        if room < 1:
            raise RequestError(f"the prompt is {prompt_tokens} tokens; model {self.stage!r} has a "
                               f"context of {self.max_len} tokens", "messages")
        limit = request.reply_limit
        if limit is not None and limit > room:
            raise RequestError(f"max_tokens {limit} + the prompt's {prompt_tokens} tokens exceed "
                               f"the context of {self.max_len}", "max_tokens")
        echo = isinstance(request, CompletionRequest) and request.echo
        top = request.top_logprobs_asked
        best_of = getattr(request, "best_of", None) or request.n
        if request.temperature == 0:  # greedy: every sample is the same, so vLLM takes one
            best_of = 1
        bias = {int(k): v for k, v in request.logit_bias.items()}
        self.check_ids(list(bias), "logit_bias")
        self.check_ids(request.stop_token_ids, "stop_token_ids")
        stops = [] if request.ignore_eos else list(self.tokenizer.stop_ids)
        try:
            return SamplingParams(
                n=best_of, temperature=request.temperature, top_p=request.top_p,
                top_k=request.top_k, min_p=request.min_p, seed=request.seed,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                repetition_penalty=request.repetition_penalty, logit_bias=bias or None,
                max_tokens=1 if limit == 0 else (limit or room),  # 0: echo alone (one is dropped)
                min_tokens=request.min_tokens, ignore_eos=request.ignore_eos,
                stop=request.stop or None, stop_token_ids=stops + request.stop_token_ids,
                include_stop_str_in_output=request.include_stop_str_in_output,
                skip_special_tokens=request.skip_special_tokens,
                logprobs=top if top is not None else (0 if best_of > request.n else None),
                prompt_logprobs=top if echo else None,
                structured_outputs=structured_outputs(request.response_format),
                output_kind=RequestOutputKind.DELTA)
        except (ValueError, VLLMValidationError) as e:  # vLLM's own checks, e.g. min_tokens above max_tokens
            raise RequestError(str(e), getattr(e, "parameter", None)) from None

    def token_text(self, token_id: int, skip_special: bool) -> tuple[str, list[int]]:
        """What a token adds to the text: its characters and bytes ('' for a skipped special)."""
        if skip_special and self.tokenizer.is_special(token_id):
            return "", []
        raw = self.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def logprobs(self, ids: list[int], positions: list[Any], top: int,
                 skip_special: bool) -> list[TokenLogprob]:
        """vLLM's per-position {token id: Logprob} as our tokens, each with its `top` likeliest."""
        tokens = []
        for token_id, alternatives in zip(ids, positions):
            text, raw = self.token_text(token_id, skip_special)
            if alternatives is None:  # a prompt's first token
                tokens.append(TokenLogprob(text, raw, None))
                continue
            likeliest = sorted((lp.rank, tid, lp.logprob) for tid, lp in alternatives.items()
                               if lp.rank is not None and lp.rank <= top)[:top]
            tokens.append(TokenLogprob(text, raw, alternatives[token_id].logprob, [
                (*self.token_text(tid, skip_special), lp) for _, tid, lp in likeliest]))
        return tokens

    # ------------------------------------------------------------------ generation

    async def generate(self, request: Request, request_id: str) -> AsyncIterator[Delta]:
        """The replies' pieces as they come, every prompt's at once; stopping early (a client
        gone) aborts them all."""
        prompts = self.prompts(request)
        params = [self.sampling_params(request, len(ids)) for ids in prompts]
        streams = [self.generate_one(request, p, ids, params[p], f"{request_id}-{p}")
                   for p, ids in enumerate(prompts)]
        if len(streams) == 1:
            async for delta in streams[0]:
                yield delta
            return
        async for delta in interleaved(streams):
            yield delta

    async def generate_one(self, request: Request, prompt: int, ids: list[int],
                           params: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        n, top = request.n, request.top_logprobs_asked
        echo = isinstance(request, CompletionRequest) and request.echo
        echo_only = request.reply_limit == 0
        best_of = params.n > n  # sample them all, keep the n best at the end
        counts, echoed, kept = [0] * params.n, set(), {}
        started = finished = refused = False
        try:
            async for output in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                     request_id):
                started = True
                for choice in output.outputs:
                    i = choice.index
                    counts[i] += len(choice.token_ids)
                    delta = Delta(prompt * n + i, choice.text, choice.finish_reason, len(ids),
                                  counts[i])
                    if params.logprobs is not None:
                        delta.logprobs = self.logprobs(list(choice.token_ids), choice.logprobs,
                                                       params.logprobs, params.skip_special_tokens)
                    if echo_only:  # the one token sampled was never asked for
                        delta = Delta(delta.index, "", "length", len(ids), 0,
                                      [] if top is not None else None)
                    if echo and i not in echoed:
                        echoed.add(i)
                        delta.echo = self.echo_text(request, prompt, ids)
                        if top is not None:
                            delta.echo_logprobs = self.logprobs(
                                ids, output.prompt_logprobs, top, params.skip_special_tokens)
                    if best_of:
                        kept[i] = merge([kept[i], delta])[0] if i in kept else delta
                    elif params.n < n:  # greedy: the one sample is every choice
                        for j in range(n):
                            yield replace(delta, index=prompt * n + j)
                    else:
                        yield delta
            finished = True
        except (ValueError, VLLMValidationError) as e:
            if started:
                raise
            # vLLM refuses what it cannot compile (a JSON schema) as the request is added
            refused = True
            structured = params.structured_outputs is not None
            raise RequestError(str(e), "response_format" if structured else None) from None
        finally:
            if not (finished or refused):
                await self.engine.abort(request_id)
                self.aborted += 1
        for rank, delta in enumerate(best_of_n(list(kept.values()), n)):
            delta.index = prompt * n + rank
            if top is None:
                delta.logprobs = None
            yield delta

    def echo_text(self, request: CompletionRequest, prompt: int, ids: list[int]) -> str:
        given = request.prompts[prompt]
        if isinstance(given, str):
            return given
        return "".join(self.token_text(i, request.skip_special_tokens)[0] for i in ids)

    # ------------------------------------------------------------------ tokenizer routes

    def tokenize(self, request: TokenizeRequest) -> dict[str, Any]:
        """POST /tokenize's reply: the ids the generation routes would feed the model."""
        if request.prompt is not None:
            ids = (self.tokenizer.encode_document(request.prompt) if request.add_special_tokens
                   else self.tokenizer.encode(request.prompt))
        else:
            ids = self.chat_ids(request.messages, request.add_generation_prompt)
        strs = [self.token_text(i, False)[0] for i in ids] if request.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.max_len, "tokens": ids, "token_strs": strs}

    def tokenizer_info(self) -> dict[str, Any]:
        return tokenizer_info(self.folder, self.max_len)

    def detokenize(self, request: DetokenizeRequest) -> dict[str, str]:
        return {"prompt": self.tokenizer.decode(self.check_ids(request.tokens, "tokens"))}

    def stats(self) -> dict[str, int]:
        """Requests the engine is working on now, and those aborted so far."""
        return {"running": self.engine.get_num_unfinished_requests(), "aborted": self.aborted}

    def shutdown(self) -> None:
        self.engine.shutdown()


def best_of_n(choices: list[Delta], n: int) -> list[Delta]:
    """The n whole choices with the highest mean logprob per token, best first (OpenAI's
    best_of)."""
    def mean_logprob(d: Delta) -> float:
        values = [t.logprob for t in d.logprobs or [] if t.logprob is not None]
        return sum(values) / max(1, len(values))
    return sorted(choices, key=mean_logprob, reverse=True)[:n]


async def pump(stream: AsyncIterator[Delta], queue: asyncio.Queue, end: object) -> None:
    """Put the stream's items on `queue`, then `end`; an error is put there too, to be raised
    by the consumer."""
    try:
        async for item in stream:
            queue.put_nowait(item)
        queue.put_nowait(end)
    except Exception as e:
        queue.put_nowait(e)


async def interleaved(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[Delta]:
    """The streams' items as each comes; closing this early closes them all (so each aborts
    its request)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    tasks = [asyncio.create_task(pump(s, queue, done)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def batched(deltas: AsyncIterator[Delta], interval_s: float) -> AsyncIterator[list[Delta]]:
    """The stream's deltas in lists: at once until some text has gone (the time to first token
    is not delayed), then what arrived in each `interval_s`.

    Each list crosses Ray twice (replica -> ingress -> HTTP proxy); on a CPU one crossing costs
    about as much as a token of a small model, so sending every token alone would halve the
    server's throughput. Closing this generator early cancels the stream (and so aborts it)."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()
    task = asyncio.create_task(pump(deltas, queue, end))
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
