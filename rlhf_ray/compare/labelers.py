"""Labelers that rank sampled responses without a person: a function from the config.

A labeler is `fn(prompt, responses, ground_truth) -> scores`: `prompt` the conversation so far (a
list of {role, content}), `responses` the K sampled replies, `ground_truth` the prompt record's
reference answer or None; one number per response, higher is better. The ranking is the
responses by score; of responses with equal scores only the first is kept, since a tie says
nothing about which is better and a forced order would teach the reward model noise.

`demo` is the demo's simulated labeler (rlhf_ray.compare.demo_judge): it knows the true facts of
the demo world and prefers a concise, correct, on-topic sentence that names the country; it marks
down hedging, filler, unrequested facts and rambling, and ranks any answer above no answer, an
answer about another country or a false fact.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

from rlhf_ray.compare import demo_judge
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


def demo_labeler(prompt: list[dict[str, str]], responses: list[str],
                 ground_truth: str | None) -> list[float]:
    """The demo's simulated person (rlhf_ray.compare.demo_judge) scoring each response."""
    return [demo_judge.score(prompt[-1]["content"], r, ground_truth) for r in responses]
