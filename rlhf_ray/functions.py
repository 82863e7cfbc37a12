"""Python functions a config names as 'module:function' (reward functions, labelers)."""

from __future__ import annotations

import importlib
from typing import Callable


def import_function(spec: str, what: str) -> Callable:
    """The function `spec` names; `what` ("reward function", "labeler") says which setting it is
    in the error when it cannot be imported or is not callable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what} {spec!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what} {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{what} {spec!r}: {module_name} has no function {attr!r}")
    return fn
