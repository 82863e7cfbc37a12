"""Rewards that are not a model: a Python function of the response (rule-based, with a ground
truth), or a remote HTTP scorer. Both check every score: an exception, a non-number or a NaN from
the scorer fails the step with the scorer and the response named, never a silently wrong update.
"""

from __future__ import annotations

import json
import math
import numbers
import urllib.error
import urllib.request
from typing import Callable, Sequence

import torch

from rlhf_ray.functions import import_function
from rlhf_ray.prompting import exact_match


def _checked(value: object, source: str, index: int) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{source} returned {value!r} for response {index}; expected a number")
    if not math.isfinite(value):
        raise ValueError(f"{source} returned {value} for response {index}; expected a finite number")
    return float(value)


def contains_answer(text: str, ground_truth: str | None) -> float:
    """1.0 if the ground truth appears in the text, else 0.0 (0.0 without a ground truth): the
    exact match of rlhf_ray.prompting, as a reward."""
    return float(exact_match(text, ground_truth))


class FunctionReward:
    """Scores responses with a Python function `(response_text, ground_truth) -> float`."""

    def __init__(self, fn: Callable[[str, str | None], float]) -> None:
        self.fn = fn
        self.name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"

    @classmethod
    def from_spec(cls, spec: str) -> FunctionReward:
        """The function named 'module:function' (PPOConfig.reward_function)."""
        return cls(import_function(spec, "reward function"))

    def score(self, texts: Sequence[str], ground_truths: Sequence[str | None] | None = None,
              prompts: Sequence[str] | None = None) -> torch.Tensor:
        """The scores (B,) as float32; a ValueError names the function and the response index."""
        if ground_truths is None:
            ground_truths = [None] * len(texts)
        if len(ground_truths) != len(texts):
            raise ValueError(f"{len(texts)} responses but {len(ground_truths)} ground truths")
        scores = []
        for i, (text, truth) in enumerate(zip(texts, ground_truths)):
            try:
                value = self.fn(text, truth)
            except Exception as e:
                raise ValueError(f"reward function {self.name} raised on response {i}: "
                                 f"{type(e).__name__}: {e}") from e
            scores.append(_checked(value, f"reward function {self.name}", i))
        return torch.tensor(scores, dtype=torch.float32)


class HTTPReward:
    """Scores responses with a remote scorer.

    POST <url> with {"prompts": [...], "responses": [...], "ground_truths": [...]} (prompts as
    rendered text); the answer must be {"scores": [one number per response]}.
    """

    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        self.url = url
        self.timeout_s = timeout_s

    def score(self, texts: Sequence[str], ground_truths: Sequence[str | None] | None = None,
              prompts: Sequence[str] | None = None) -> torch.Tensor:
        body = json.dumps({"prompts": list(prompts or [""] * len(texts)), "responses": list(texts),
                           "ground_truths": list(ground_truths or [None] * len(texts))}).encode()
        request = urllib.request.Request(self.url, data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise ValueError(f"reward scorer {self.url} answered HTTP {e.code}: "
                             f"{e.read()[:200].decode(errors='replace')}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise ValueError(f"reward scorer {self.url} unreachable: {e}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"reward scorer {self.url} did not answer JSON: {e}") from None
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or len(scores) != len(texts):
            raise ValueError(f"reward scorer {self.url}: expected {{\"scores\": [{len(texts)} "
                             f"numbers]}}, got {str(answer)[:200]}")
        source = f"reward scorer {self.url}"
        return torch.tensor([_checked(v, source, i) for i, v in enumerate(scores)],
                            dtype=torch.float32)
