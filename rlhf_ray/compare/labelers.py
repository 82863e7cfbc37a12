"""Labelers that rank sampled responses without a person: a function from the config.

A labeler is `fn(prompt, responses, ground_truth) -> scores`: `prompt` the conversation so far (a
list of {role, content}), `responses` the K sampled replies, `ground_truth` the prompt record's
reference answer or None; one number per response, higher is better. The ranking is the
responses by score; of responses with equal scores only the first is kept, since a tie says
nothing about which is better and a forced order would teach the reward model noise.

`demo` is the demo's simulated labeler. It knows the true facts of the demo world and prefers,
in this order, a correct answer to a wrong one or to one about another country, a complete sentence
naming the country to a bare fact, and a polite, to-the-point reply to rambling, questions back or
silence.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Callable

from rlhf_ray.data.demo import ATTRIBUTES, fact
from rlhf_ray.data.world import COUNTRIES
from rlhf_ray.functions import import_function

Labeler = Callable[[list[dict[str, str]], list[str], "str | None"], list[float]]


def load_labeler(spec: str) -> Labeler:
    """'demo' or 'module:function'; refuses (naming it) what cannot be imported or called."""
    return demo_labeler if spec == "demo" else import_function(spec, "labeler")


def ranked_by_scores(responses: list[str], scores: list[float]) -> list[str]:
    """Best first; of equal scores the first response only."""
    kept: dict[float, str] = {}
    for response, score in zip(responses, scores):
        kept.setdefault(score, response)
    return [kept[s] for s in sorted(kept, reverse=True)]


def checked_scores(scores: object, count: int, name: str) -> list[float]:
    if not isinstance(scores, (list, tuple)) or len(scores) != count:
        raise ValueError(f"labeler {name} returned {str(scores)[:80]}; expected {count} numbers")
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
            raise ValueError(f"labeler {name} returned {s!r} for response {i}; expected a finite number")
    return [float(s) for s in scores]


# --------------------------------------------------------------------------- the demo's labeler

BY_NAME = {c.name: c for c in COUNTRIES}
LONGEST_FIRST = sorted(BY_NAME, key=len, reverse=True)  # "South Korea" before "Korea"


def mentions(text: str, phrase: str) -> bool:
    """`phrase` as whole words ("Niger" is not in "Nigeria", "8 million" not in "68 million")."""
    return re.search(rf"(?<![\w.,]){re.escape(phrase)}(?!\w)", text) is not None


def asked_about(question: str, ground_truth: str | None) -> tuple[str | None, str | None]:
    """The country a question names and the attribute whose fact is `ground_truth`."""
    name = next((n for n in LONGEST_FIRST if mentions(question, n)), None)
    if name is None or ground_truth is None:
        return name, None
    return name, next((a for a in ATTRIBUTES if fact(BY_NAME[name], a) == ground_truth), None)


def demo_labeler(prompt: list[dict[str, str]], responses: list[str],
                 ground_truth: str | None) -> list[float]:
    question = prompt[-1]["content"]
    country, attribute = asked_about(question, ground_truth)
    others = {fact(c, attribute) for c in COUNTRIES} - {ground_truth} if attribute else set()
    return [_score(r, country, ground_truth, others) for r in responses]


def _score(reply: str, country: str | None, truth: str | None, others: set[str]) -> float:
    text = reply.strip()
    if not text:
        return -10.0
    right = truth is not None and mentions(text, truth)
    wrong = any(mentions(text, o) for o in others)
    score = {(True, False): 4.0, (True, True): 0.0, (False, True): -4.0, (False, False): -1.0}[
        (right, wrong)]
    named = country is not None and mentions(text, country)
    if right and named:
        score += 1.0  # a complete sentence, not a bare fact
    if country is not None and not named and any(mentions(text, n) for n in BY_NAME):
        score -= 6.0  # about another country ("Greece uses the euro", asked about France): below
        # "I don't know", above a wrong fact, as the demo's template comparisons rank it
    if text.endswith((".", "!")):
        score += 0.5
    if "?" in text:  # questions back, or the base model's habit of listing more questions
        score -= 1.0
    if len(text.split()) > 20:  # rambling buries the answer
        score -= 1.0
    return score
