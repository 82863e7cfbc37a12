"""How each kind of model is asked a question, and when its reply counts as right.

A base model only continues documents, so a conversation reaches it as a document: the turns'
texts, one per line, and the model writes the next line. A chat model (SFT, RLHF) gets the
conversation in the chat template and writes the assistant's next turn. Serving, the evaluation
and the report all prompt through here, so a base model is asked the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhf_ray.data.records import Message
from rlhf_ray.tokenizer import ChatTokenizer


def as_document(messages: Sequence[Message]) -> str:
    """A conversation as a document to continue: each turn's text on its own line."""
    return "\n".join(m.content for m in messages) + "\n"


def few_shot_document(examples: Sequence[tuple[str, str]], question: str) -> str:
    """k worked examples `Q: question\\nA: answer`, then the question with the answer left open;
    with no examples, the bare question as a document line."""
    if not examples:
        return as_document([Message(role="user", content=question)])
    return "".join(f"Q: {q}\nA: {a}\n\n" for q, a in examples) + f"Q: {question}\nA:"


def prompt_ids(tokenizer: ChatTokenizer, serves: str, messages: Sequence[Message]) -> list[int]:
    """The ids a model that `serves` "document" or "chat" continues (rlhf_ray.run.serves_as)."""
    if serves == "document":
        return tokenizer.encode_document(as_document(messages))
    if messages[-1].role == "assistant":
        raise ValueError("the last message must be the user's (or the system's): the model "
                         "writes the assistant's next turn")
    return tokenizer.render_prompt(messages)


def exact_match(reply: str, reference: str | None) -> bool:
    """The reference answer appears verbatim in the reply ("The capital of Kenya is Nairobi."
    matches "Nairobi"); nothing matches a missing reference."""
    return bool(reference) and reference in reply
