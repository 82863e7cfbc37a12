"""The HTTP side shared by the served apps: OpenAI-compatible request bodies as pydantic models,
OpenAI's error shape, and the API key.

The bodies take every field of OpenAI's chat and completions API that a text model can honour,
and the vLLM extensions common clients send (top_k, min_p, repetition_penalty, min_tokens,
ignore_eos, skip_special_tokens, include_stop_str_in_output, stop_token_ids). A field asking for
what these models cannot do (tools, images, audio, ...) is a 400 that names it and says why, and
an unknown field is a 400 too, as OpenAI answers (vLLM ignores them): a client never believes a
setting took effect when it did not. A null is the field's default, as OpenAI treats it.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TEXT_ONLY = "the models served here read and write text only"
NO_TOOLS = "function calling is not supported: the models served here have no tool template"
MAX_LOGPROBS = 20  # vLLM's default max_logprobs: the most alternatives a position reports
MAX_PROMPTS = 64  # prompts in one completions request


class Unsupported(ValueError):
    """A field set to something the server cannot do; `param` names it."""

    def __init__(self, param: str, why: str) -> None:
        super().__init__(f"{param}: {why}")
        self.param = param


def refuse_unsupported(data: Any, fields: dict[str, str], neutral: tuple = (None, [], {}, "none")) -> Any:
    """Raise Unsupported for the first of `fields` (name: why) set to something not neutral;
    drop the neutral ones (what clients send when they mean "no tools", say)."""
    if isinstance(data, dict):
        for name, why in fields.items():
            if name in data and data[name] not in neutral:
                raise Unsupported(name, why)
            data.pop(name, None)
    return data


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str = Field(description="Text, or a list of {type: text, text} parts (joined by newlines).")
    name: str | None = None  # a participant's name: accepted, not shown to the model

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("role") in ("tool", "function"):
            raise Unsupported("role", f"{data['role']!r} messages answer tool calls; {NO_TOOLS}")
        data = refuse_unsupported(data, {"tool_calls": NO_TOOLS, "function_call": NO_TOOLS,
                                         "audio": TEXT_ONLY, "refusal": "a refusal is not a "
                                         "turn the models can be shown; send it as content"})
        if isinstance(data, dict):
            data.pop("annotations", None)  # OpenAI's own replies carry it; clients echo them back
        return data

    @field_validator("content", mode="before")
    @classmethod
    def _joined_parts(cls, content: Any) -> Any:
        if not isinstance(content, list):
            return content
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise Unsupported(str(i), f"a part of type {kind!r}; {TEXT_ONLY}, as "
                                  "{'type': 'text', 'text': ...} parts")
            texts.append(part["text"])
        return "\n".join(texts)

    @property
    def prompt_role(self) -> str:
        """The role the models know: OpenAI's `developer` is the system prompt's new name."""
        return "system" if self.role == "developer" else self.role


class StreamOptions(Body):
    include_usage: bool = False


class JSONSchema(Body):
    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Body):
    """`text`; `json_object` (any JSON object); `json_schema` (JSON valid against its schema).
    Both JSON kinds are enforced while sampling, through vLLM's structured outputs."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only with it")
        return self


TokenId = Annotated[int, Field(ge=0)]


class SamplingFields(Body):
    """What chat and completion requests share."""

    model: str = Field(description="A stage name: base, sft, rlhf (see GET /v1/models).")
    max_tokens: int | None = Field(None, ge=0, description="Longest reply (None: the context's rest).")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8, description="Replies to sample.")
    stop: str | list[str] = Field([], description="Up to 4 strings that end a reply.")
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] = Field(
        {}, max_length=300, description="Token id (as a string) -> a bias added to its logit.")
    response_format: ResponseFormat | None = None
    user: str | None = None  # an end user's id: accepted, not used
    metadata: dict[str, Annotated[str, Field(max_length=512)]] = Field({}, max_length=16)
    store: bool = Field(False, description="Only false: this server keeps no completions.")
    service_tier: Literal["auto", "default"] | None = None
    # vLLM's extensions, which its clients send
    top_k: int = Field(0, ge=-1, description="Sample from the k likeliest tokens (0 or -1: all).")
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = Field(False, description="Go on past the end of the reply, to max_tokens.")
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_token_ids: list[TokenId] = []

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str]) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop)
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float]) -> dict[str, float]:
        for key in bias:
            if not key.isdigit():
                raise ValueError(f"key {key!r} is not a token id (keys are token ids as strings)")
        return bias

    @field_validator("store")
    @classmethod
    def _nothing_stored(cls, store: bool) -> bool:
        if store:
            raise ValueError("this server keeps no completions, so it cannot store them")
        return store

    @property
    def reply_limit(self) -> int | None:
        return self.max_tokens

    @property
    def top_logprobs_asked(self) -> int | None:
        """Alternatives to report per token (0: the chosen token's alone; None: no logprobs)."""
        return None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="max_tokens' new name.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="before")
    @classmethod
    def _text_model(cls, data: Any) -> Any:
        data = refuse_unsupported(data, {
            "tools": NO_TOOLS, "functions": NO_TOOLS, "function_call": NO_TOOLS,
            "audio": TEXT_ONLY, "prediction": "predicted outputs are not supported",
            "reasoning_effort": "the models served here are not reasoning models",
            "web_search_options": "web search is not available here",
        })
        if isinstance(data, dict):
            if data.get("tool_choice") not in (None, "none", "auto"):
                raise Unsupported("tool_choice", NO_TOOLS)
            if data.get("modalities") not in (None, ["text"]):
                raise Unsupported("modalities", TEXT_ONLY)
            data.pop("tool_choice", None), data.pop("modalities", None)
            data.pop("parallel_tool_calls", None)  # meaningless without tools, which are refused
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.max_tokens == 0:
            raise Unsupported("max_tokens", "must be at least 1")
        if None not in (self.max_tokens, self.max_completion_tokens) and \
                self.max_tokens != self.max_completion_tokens:
            raise Unsupported("max_completion_tokens", f"{self.max_completion_tokens} differs "
                              f"from max_tokens {self.max_tokens}; send one of them")
        if self.top_logprobs is not None and not self.logprobs:
            raise Unsupported("top_logprobs", "needs logprobs: true")
        return self

    @property
    def reply_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


Prompt = str | list[str] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(SamplingFields):
    prompt: Prompt = Field(description="Text, texts, token ids, or lists of token ids.")
    echo: bool = Field(False, description="Return the prompt before the reply (with its "
                       "logprobs when logprobs is set; max_tokens 0 returns the prompt alone).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=16, description="Sample this many, return the n "
                                "with the highest mean logprob per token (not with stream).")

    @model_validator(mode="before")
    @classmethod
    def _left_to_right(cls, data: Any) -> Any:
        return refuse_unsupported(data, {"suffix": "insertion is not supported: the models "
                                                   "only continue text"}, neutral=(None, ""))

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise Unsupported("max_tokens", "0 needs echo: true (it asks for the prompt alone)")
        prompts = self.prompts
        if not 1 <= len(prompts) <= MAX_PROMPTS or any(p == [] for p in prompts):
            raise Unsupported("prompt", f"1 to {MAX_PROMPTS} prompts, none of them an empty "
                              "list of token ids")
        if self.best_of is not None and self.best_of < self.n:
            raise Unsupported("best_of", f"{self.best_of} is less than n {self.n}")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise Unsupported("best_of", "cannot stream: the best are known only at the end")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    @property
    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


class ScoreRequest(Body):
    """Score a conversation, or rank candidate replies to it, with the reward model.

    `messages` ends with the assistant's reply to score; with `candidates`, it ends with the user's
    turn and each candidate is scored as the assistant's reply to it.
    """

    model: str = Field("reward", description="The reward model's id.")
    messages: list[ChatMessage] = Field(min_length=1)
    candidates: list[str] | None = Field(None, min_length=1, max_length=16)


RUN_TOKENIZER = ("A stage of the run; without it, the run's first stage: every stage of a run has "
                 "the tokenizer its base was trained with, and vLLM's server (one model) takes none.")


class TokenizeRequest(Body):
    """POST /tokenize, as vLLM's server has it: a text, or messages rendered as the chat route
    renders them."""

    model: str | None = Field(None, description=RUN_TOKENIZER)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(True, description="With prompt: the document's start token, "
                                     "as /v1/completions adds it.")
    add_generation_prompt: bool = Field(True, description="With messages: end with the "
                                        "assistant's turn opening, as the chat route does.")
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send prompt or messages, one of them")
        return self


class DetokenizeRequest(Body):
    model: str | None = Field(None, description=RUN_TOKENIZER)
    tokens: list[TokenId]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """The first thing wrong with a body, as "field: what", and the field's dotted name."""
    first = e.errors()[0]
    loc = [str(p) for p in first["loc"]]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, Unsupported):
        param = ".".join(loc + [cause.param])
        return f"{param}: {str(cause).split(': ', 1)[1]}", param
    param = ".".join(loc) or None
    what = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        what = ("not a field this server takes (it refuses unknown fields, as OpenAI does; "
                "docs/serving.md lists the fields)")
    return (f"{param}: {what}" if param else what), param


def read_api_key(env: str | None) -> str | None:
    """The key in environment variable `env` (None: no key is required)."""
    if env is None:
        return None
    if not os.environ.get(env):
        raise ValueError(f"serve.api_key_env is {env!r}, but that environment variable is not "
                         "set (or empty)")
    return os.environ[env]


def refusal(api_key: str | None, request: Request) -> JSONResponse | None:
    """The 401 for a request without the API key (when one is set); None lets it through."""
    if api_key is None or request.headers.get("authorization", "") == f"Bearer {api_key}":
        return None
    return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                 code="invalid_api_key")
