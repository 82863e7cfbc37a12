"""The HTTP side shared by the served apps: OpenAI-compatible bodies as pydantic models, OpenAI's
error shape, and the API key.

Only the fields this server honours are accepted; an unknown field is a 400 that names it, so a
client never believes a setting took effect when it did not.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(Body):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None  # accepted for compatibility, not used


class StreamOptions(Body):
    include_usage: bool = False


class SamplingFields(Body):
    """What chat and completion requests share."""

    model: str = Field(description="A stage name: base, sft, rlhf (see GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="Longest reply (None: the context's rest).")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8, description="Replies to sample.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end a reply.")
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility, not used

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        return stops


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str = Field(min_length=1)


class ScoreRequest(Body):
    """Score a conversation, or rank candidate replies to it, with the reward model.

    `messages` ends with the assistant's reply to score; with `candidates`, it ends with the user's
    turn and each candidate is scored as the assistant's reply to it.
    """

    model: str = Field("reward", description="The reward model's id.")
    messages: list[ChatMessage] = Field(min_length=1)
    candidates: list[str] | None = Field(None, min_length=1, max_length=16)


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


def refusal(api_key: str | None, request: Request) -> JSONResponse | None:
    """The 401 for a request without the API key (when one is set); None lets it through."""
    if api_key is None or request.headers.get("authorization", "") == f"Bearer {api_key}":
        return None
    return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                 code="invalid_api_key")


@dataclass
class Delta:
    """A piece of one choice's reply."""

    index: int
    text: str
    finish_reason: str | None  # "stop", "length" or None while it goes on
    prompt_tokens: int
    completion_tokens: int  # so far, for this choice


def merge(batch: list[Delta]) -> list[Delta]:
    """A batch's deltas joined per choice (choices in the order they first appear)."""
    merged: dict[int, Delta] = {}
    for d in batch:
        m = merged.get(d.index)
        merged[d.index] = d if m is None else Delta(
            d.index, m.text + d.text, d.finish_reason or m.finish_reason, d.prompt_tokens,
            d.completion_tokens)
    return list(merged.values())
