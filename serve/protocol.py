"""The OpenAI-compatible HTTP bodies, as pydantic models: what a request may say, what we answer.

Only the fields this server honours are accepted; an unknown field is a 400 that names it, so a
client never believes a setting took effect when it did not.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
