"""Schemas of the record formats every stage reads (field names as in the wider ecosystem).

    pretraining   TextRecord        {"text": ...}
    SFT           ChatRecord        {"messages": [...]}  or  {"prompt": ..., "completion": ...}
    reward model  ComparisonRecord  {"prompt", "chosen", "rejected"}  or  {"prompt", "responses"}
    RL            PromptRecord      {"prompt": ..., "ground_truth": ...}

A prompt or response may be a string or a list of messages; each model normalises its input to
message lists, so later stages see one form. Conversations follow one set of turn rules
(`check_turns`); a violation names the message, e.g. `messages[2].role`.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator, model_validator

Role = Literal["system", "user", "assistant"]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str


def check_turns(
    messages: list[Message],
    field: str,
    *,
    first: Role,
    last: Role | None = None,
    allow_system: bool = True,
    need_assistant: bool = False,
) -> None:
    """Raise ValueError unless `messages` is a well-formed run of turns.

    An optional system message comes first (if `allow_system`), then turns alternate between user
    and assistant starting with `first` and, if given, ending with `last`. User and assistant turns
    must have content. `field` is the name used in the error, e.g. "messages" or "responses[1]".
    """
    if not messages:
        raise ValueError(f"{field}: empty; at least {_a_turn(first)} is needed")
    expected = first
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if message.role == "system":
            if index > 0 or not allow_system:
                allowed = "only allowed first" if allow_system else "not allowed here"
                raise ValueError(f"{where}.role: a system message is {allowed} (got 'system')")
            continue
        if message.role != expected:
            if index == 0 or messages[index - 1].role == "system":
                problem = f"{field} must start with {_a_turn(first)}"
            else:  # roles are user/assistant from here, so the previous turn had this role too
                problem = f"two {message.role} turns in a row; user and assistant turns alternate"
            raise ValueError(f"{where}.role: {problem} (got {message.role!r})")
        if not message.content.strip():
            raise ValueError(f"{where}.content: empty {message.role} turn (got {message.content!r})")
        expected = "assistant" if expected == "user" else "user"
    final = messages[-1].role
    if last is not None and final != last:
        where = f"{field}[{len(messages) - 1}].role"
        raise ValueError(f"{where}: {field} must end with {_a_turn(last)} (got {final!r})")
    if need_assistant and not any(m.role == "assistant" for m in messages):
        raise ValueError(f"{field}: a conversation without an assistant turn; there is nothing to learn from")


def _a_turn(role: Role) -> str:
    return f"an {role} turn" if role == "assistant" else f"a {role} turn"


def _as_messages(value: Any, role: Role) -> Any:
    """A string becomes one message with `role`; anything else is left for validation."""
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _require(data: dict[str, Any], names: tuple[str, ...], form: str) -> None:
    for name in names:
        if name not in data:
            raise ValueError(f"{name}: missing; {form}")


class Record(BaseModel):
    """Base of the record kinds: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")
    # Where the record was read ("file:line"), for errors found after validation (e.g. length).
    _where: str = PrivateAttr(default="<memory>")

    @property
    def where(self) -> str:
        return self._where

    def __eq__(self, other: object) -> bool:
        """Records are equal by content, wherever they were read."""
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]


class TextRecord(Record):
    """One pretraining document."""

    text: str

    @field_validator("text")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("empty document")
        return text


class ChatRecord(Record):
    """One SFT conversation. Input `prompt` + `completion` is turned into `messages` (errors then
    name positions in the joined list)."""

    messages: list[Message]

    @model_validator(mode="before")
    @classmethod
    def _from_prompt_completion(cls, data: Any) -> Any:
        if not isinstance(data, dict) or ("prompt" not in data and "completion" not in data):
            return data
        if "messages" in data:
            raise ValueError("give either `messages` or `prompt` + `completion`, not both")
        _require(data, ("prompt", "completion"), "a chat record is `messages`, or `prompt` + `completion`")
        data = dict(data)
        prompt = _as_messages(data.pop("prompt"), "user")
        completion = _as_messages(data.pop("completion"), "assistant")
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, list):
                got = type(value).__name__
                raise ValueError(f"{name}: expected a string or a list of messages (got {got})")
        return {**data, "messages": prompt + completion}

    @model_validator(mode="after")
    def _turns(self) -> ChatRecord:
        check_turns(self.messages, "messages", first="user", need_assistant=True)
        return self


class ComparisonRecord(Record):
    """Responses to one prompt, best first. Input `chosen` + `rejected` becomes
    `responses = [chosen, rejected]`. A ranking collected by `rlhf-ray compare-data` also says
    which prompt it ranks, who ranked it and when, and which responses were unacceptable."""

    prompt: list[Message]
    responses: list[list[Message]]
    id: str | None = None
    labeler: str | None = None
    time: str | None = None  # ISO 8601, UTC
    unacceptable: list[int] = []  # positions in `responses` (best first) marked unacceptable

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "chosen" in data or "rejected" in data:
            if "responses" in data:
                raise ValueError("give either `chosen` + `rejected` or `responses`, not both")
            _require(data, ("chosen", "rejected"), "a comparison needs both `chosen` and `rejected`")
            data["responses"] = [data.pop("chosen"), data.pop("rejected")]
        if "prompt" in data:
            data["prompt"] = _as_messages(data["prompt"], "user")
        if isinstance(data.get("responses"), list):
            data["responses"] = [_as_messages(r, "assistant") for r in data["responses"]]
        return data

    @model_validator(mode="after")
    def _turns(self) -> ComparisonRecord:
        check_turns(self.prompt, "prompt", first="user", last="user")
        if len(self.responses) < 2:
            got = len(self.responses)
            raise ValueError(f"responses: a comparison needs at least 2 responses (got {got})")
        for index, response in enumerate(self.responses):
            check_turns(
                response, f"responses[{index}]", first="assistant", last="assistant", allow_system=False
            )
        for better, worse in combinations(range(len(self.responses)), 2):
            if self.responses[better] == self.responses[worse]:
                raise ValueError(
                    f"responses[{worse}]: identical to responses[{better}] (chosen == rejected); "
                    "the responses of a comparison must differ"
                )
        for index in self.unacceptable:
            if not 0 <= index < len(self.responses):
                raise ValueError(f"unacceptable: {index} is not a position in responses "
                                 f"(0..{len(self.responses) - 1})")
        return self

    def pairs(self) -> list[tuple[list[Message], list[Message]]]:
        """Every (better, worse) pair of the ranking: K responses give K*(K-1)/2 pairs."""
        ranked = self.responses
        return [(ranked[i], ranked[j]) for i, j in combinations(range(len(ranked)), 2)]


class PromptRecord(Record):
    """One RL prompt, with an optional reference answer for rule-based rewards."""

    prompt: list[Message]
    ground_truth: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if isinstance(data, dict) and "prompt" in data:
            data = {**data, "prompt": _as_messages(data["prompt"], "user")}
        return data

    @model_validator(mode="after")
    def _turns(self) -> PromptRecord:
        check_turns(self.prompt, "prompt", first="user", last="user")
        return self
