"""What each stage's model does with a question: the talk's demonstration, measured.

A base model gets the question as a document to continue; a chat model gets it as a user turn.
On held-out prompts with a reference answer, a reply counts as an exact match when the reference
answer appears in it verbatim ("The capital of Kenya is Nairobi." matches "Nairobi").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from rlhf_ray.data.records import Message, PromptRecord
from rlhf_ray.modeling import load_policy
from rlhf_ray.tokenizer import load_tokenizer

DEMO_QUESTION = "What is the capital of France?"


def generate_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int,
                    batch_size: int = 64, model: PreTrainedModel | None = None) -> list[list[int]]:
    """Greedy continuations (stop tokens excluded), batched with left padding. `model`: the
    folder's model already loaded, so that a caller generating several times loads it once."""
    tokenizer = load_tokenizer(model_dir)
    model = (model if model is not None else load_policy(model_dir)).eval()
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[tokenizer.pad_id] * (width - len(p)) + p for p in chunk], device=model.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tokenizer.stop_ids,
                                 pad_token_id=tokenizer.pad_id)
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in tokenizer.stop_ids), len(row))
            outputs.append(row[:cut])
    return outputs


def continue_document(model_dir: Path, text: str, max_new_tokens: int = 48) -> str:
    tokenizer = load_tokenizer(model_dir)
    return tokenizer.decode(generate_greedy(model_dir, [tokenizer.encode_document(text)], max_new_tokens)[0])


def chat_replies(model_dir: Path, conversations: list[list[Message]], max_new_tokens: int = 48) -> list[str]:
    tokenizer = load_tokenizer(model_dir)
    prompts = [tokenizer.render_prompt(c) for c in conversations]
    return [tokenizer.decode(ids) for ids in generate_greedy(model_dir, prompts, max_new_tokens)]


@dataclass
class ExactMatch:
    rate: float
    count: int
    samples: list[dict[str, str]]  # a few prompts with their reply and reference answer


def exact_match(model_dir: Path, records: list[PromptRecord], max_new_tokens: int = 48) -> ExactMatch:
    scored = [r for r in records if r.ground_truth]
    if not scored:
        raise ValueError("exact match needs prompts with a ground_truth")
    replies = chat_replies(model_dir, [r.prompt for r in scored], max_new_tokens)
    hits = [r.ground_truth in reply for r, reply in zip(scored, replies)]
    samples = [{"prompt": r.prompt[-1].content, "reply": reply, "answer": r.ground_truth or ""}
               for r, reply in zip(scored[:5], replies[:5])]
    return ExactMatch(sum(hits) / len(hits), len(hits), samples)


def save_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
