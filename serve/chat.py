"""`rlhf-ray chat`: a terminal client for a running server; it keeps the conversation and streams
each reply as it comes. A line `/reset` starts a new conversation; end of input (Ctrl-D) quits."""

from __future__ import annotations

import sys
from typing import TextIO

import openai


def chat(url: str, model: str, api_key: str | None, temperature: float, max_tokens: int,
         lines: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    client = openai.OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=api_key or "none", max_retries=0)
    history: list[dict[str, str]] = []
    interactive = lines.isatty()
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = lines.readline()
        if not line:
            return
        prompt = line.strip()
        if not prompt:
            continue
        if prompt == "/reset":
            history.clear()
            continue
        history.append({"role": "user", "content": prompt})
        out.write(f"{model}> ")
        reply = ""
        try:
            for chunk in client.chat.completions.create(model=model, messages=history, stream=True,
                                                        temperature=temperature, max_tokens=max_tokens):
                delta = chunk.choices[0].delta.content or "" if chunk.choices else ""
                reply += delta
                out.write(delta)
                out.flush()
        except openai.APIError as e:
            history.pop()
            message = e.body.get("message", str(e)) if isinstance(e.body, dict) else str(e)
            out.write(f"[error: {message}]\n")
            continue
        out.write("\n")
        history.append({"role": "assistant", "content": reply})
