"""Greedy generation with the transformers model: what the evaluation across stages
(rlhf_ray.stage_eval) generates with, on the same weights it measures the KL with."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch
from transformers import PreTrainedModel

from rlhf_ray.modeling import load_policy
from rlhf_ray.tokenizer import ChatTokenizer, load_tokenizer


def generate_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int,
                    batch_size: int = 64, model: PreTrainedModel | None = None,
                    end_after: Collection[int] = ()) -> list[list[int]]:
    """Greedy continuations (stop tokens excluded), batched with left padding. `model`: the
    folder's model already loaded, so that a caller generating several times loads it once.
    `end_after`: tokens that also end a continuation, kept in it (a base model's reply is its
    first line: generating past the newline would only be cut off)."""
    tokenizer = load_tokenizer(model_dir)
    model = (model if model is not None else load_policy(model_dir)).eval()
    stops, ends = set(tokenizer.stop_ids), set(end_after)
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[tokenizer.pad_id] * (width - len(p)) + p for p in chunk], device=model.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=[*tokenizer.stop_ids, *sorted(ends)],
                                 pad_token_id=tokenizer.pad_id)
        for row in out[:, width:].tolist():
            cut = next((i + (t in ends) for i, t in enumerate(row) if t in stops or t in ends), len(row))
            outputs.append(row[:cut])
    return outputs


def newline_tokens(tokenizer: ChatTokenizer) -> set[int]:
    """The ids whose text holds a line break (e.g. "\n", "?\n")."""
    return {i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i])}
