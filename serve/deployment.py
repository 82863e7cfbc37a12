"""What the served applications are called: their names, routes and import paths, and the names
of their deployments. serve/serve_config.yaml and deploy/rayservice.yaml spell the same names for
Ray's own tools; tests/unit/test_serve_config.py holds both to this module."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_ray.run import REWARD_MODEL


@dataclass(frozen=True)
class App:
    name: str  # Serve's application name (ray_serve.status().applications[name])
    route_prefix: str
    import_path: str  # module:function that builds it from the config's `args`


CHAT_APP = App("rlhf-ray", "/", "serve.app:app_builder")
RANK_APP = App("rlhf-ray-rank", "/rank", "serve.rank:app_builder")
INGRESS = "Ingress"  # the chat app's ingress deployment


def deployment_name(model: str) -> str:
    """The deployment that serves `model` (a chat stage, or the reward model)."""
    return REWARD_MODEL if model == REWARD_MODEL else f"stage-{model}"
