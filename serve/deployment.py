"""What the served applications are called: their names, routes and import paths, and the names
of their deployments: the chat app (the router and the reward model), one app per chat stage,
and the ranking page. serve/serve_config.yaml and deploy/rayservice.yaml spell the same names for
Ray's own tools; tests/unit/test_serve_config.py holds both to this module."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_ray.run import CHAT_MODELS, REWARD_MODEL


@dataclass(frozen=True)
class App:
    name: str  # Serve's application name (ray_serve.status().applications[name])
    route_prefix: str
    import_path: str  # module:function that builds it from the config's `args`


CHAT_APP = App("rlhf-ray", "/", "serve.app:app_builder")
RANK_APP = App("rlhf-ray-rank", "/rank", "serve.rank:app_builder")
ROUTER = "Router"  # the chat app's ingress deployment


STAGE_APP_PREFIX = "rlhf-ray-"


def stage_app(stage: str) -> App:
    """A chat stage's own app: its deployment is the ingress, at /<stage> (/sft/v1/...)."""
    return App(f"{STAGE_APP_PREFIX}{stage}", f"/{stage}", "serve.app:stage_app_builder")


def stage_of_app(name: str) -> str | None:
    """The chat stage whose own app is called `name` (None for any other app)."""
    stage = name.removeprefix(STAGE_APP_PREFIX)
    return stage if name.startswith(STAGE_APP_PREFIX) and stage in CHAT_MODELS else None


def deployment_name(model: str) -> str:
    """The deployment that serves `model` (a chat stage, or the reward model)."""
    return REWARD_MODEL if model == REWARD_MODEL else f"stage-{model}"
