"""Replies: the pieces a stage's engine streams to the ingress (`Delta`s, with their tokens'
logprobs), and the OpenAI response bodies and stream chunks made of them.

Logprobs come in OpenAI's two shapes: chat's `{"content": [{token, logprob, bytes,
top_logprobs}]}` and completions' `{tokens, token_logprobs, top_logprobs, text_offset}`, where a
prompt echoed before the reply comes first and its first token has no logprob (nothing precedes
it). A token's text is what it adds to the reply: '' for a special token the text leaves out, so
the tokens' texts join to the reply and `text_offset` indexes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LEAST_LOGPROB = -9999.0  # what OpenAI reports for a token the model rules out (JSON has no -inf)


@dataclass
class TokenLogprob:
    token: str  # the text this token adds to the reply
    bytes: list[int]  # its bytes (a token may hold part of a character)
    logprob: float | None  # None: a prompt's first token
    top: list[tuple[str, list[int], float]] = field(default_factory=list)  # likeliest here, best first


@dataclass
class Delta:
    """A piece of one choice's reply."""

    index: int  # the choice: prompt_index * n + sample
    text: str
    finish_reason: str | None  # "stop", "length" or None while it goes on
    prompt_tokens: int  # of this choice's prompt
    completion_tokens: int  # so far, for this choice
    logprobs: list[TokenLogprob] | None = None  # of this piece's tokens, when asked for
    echo: str | None = None  # with echo, in a choice's first piece: the prompt's text ...
    echo_logprobs: list[TokenLogprob] | None = None  # ... and its tokens' logprobs when asked


def merge(batch: list[Delta]) -> list[Delta]:
    """A batch's deltas joined per choice (choices in the order they first appear)."""
    merged: dict[int, Delta] = {}
    for d in batch:
        m = merged.get(d.index)
        if m is None:
            merged[d.index] = d
            continue
        merged[d.index] = Delta(
            d.index, m.text + d.text, d.finish_reason or m.finish_reason, d.prompt_tokens,
            d.completion_tokens, None if m.logprobs is None else m.logprobs + (d.logprobs or []),
            m.echo, m.echo_logprobs)
    return list(merged.values())


def finite(logprob: float) -> float:
    return max(logprob, LEAST_LOGPROB)


def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [{
        "token": t.token, "logprob": finite(t.logprob), "bytes": t.bytes,
        "top_logprobs": [{"token": s, "logprob": finite(lp), "bytes": b} for s, b, lp in t.top],
    } for t in tokens], "refusal": None}


def completion_logprobs(tokens: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """Completions' shape; `offset` is where the first token's text starts in the choice's text."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [None if t.logprob is None else finite(t.logprob) for t in tokens],
        "top_logprobs": [None if t.logprob is None else {s: finite(lp) for s, _, lp in t.top}
                         for t in tokens],
        "text_offset": offsets,
    }


def usage(prompt_tokens: dict[int, int], completion_tokens: int) -> dict[str, int]:
    """`prompt_tokens`: each prompt's length, by prompt index."""
    prompt = sum(prompt_tokens.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}


class Choices:
    """The choices of one request as their deltas arrive, rendered in OpenAI's shapes."""

    def __init__(self, n: int, chat: bool, logprobs: bool) -> None:
        self.n, self.chat, self.logprobs = n, chat, logprobs
        self.texts: dict[int, str] = {}
        self.finish: dict[int, str | None] = {}
        self.tokens: dict[int, list[TokenLogprob]] = {}
        self.counts: dict[int, int] = {}
        self.prompt_tokens: dict[int, int] = {}

    def add(self, delta: Delta) -> dict[str, Any] | None:
        """Take a delta; return its choice as a stream chunk shows it (None: nothing to show)."""
        i = delta.index
        start = len(self.texts.get(i, ""))
        text = (delta.echo or "") + delta.text
        tokens = (delta.echo_logprobs or []) + (delta.logprobs or [])
        self.texts[i] = self.texts.get(i, "") + text
        self.finish[i] = delta.finish_reason or self.finish.get(i)
        self.tokens.setdefault(i, []).extend(tokens)
        self.counts[i] = delta.completion_tokens
        self.prompt_tokens[i // self.n] = delta.prompt_tokens
        if not (text or delta.finish_reason or tokens):
            return None
        return self.choice(i, text, tokens, start, delta.finish_reason)

    def choice(self, i: int, text: str, tokens: list[TokenLogprob], start: int,
               finish: str | None, whole: bool = False) -> dict[str, Any]:
        logprobs = None
        if self.logprobs:
            logprobs = chat_logprobs(tokens) if self.chat else completion_logprobs(tokens, start)
        if not self.chat:
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
        body = {"role": "assistant", "content": text} if whole else {"content": text}
        return {"index": i, "message" if whole else "delta": body, "logprobs": logprobs,
                "finish_reason": finish}

    def whole(self) -> list[dict[str, Any]]:
        """Every choice, complete (a non-streaming response's `choices`)."""
        return [self.choice(i, self.texts[i], self.tokens[i], 0, self.finish[i], whole=True)
                for i in sorted(self.texts)]

    def usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, sum(self.counts.values()))
