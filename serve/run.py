"""Start the serve application on a Ray cluster (an embedded local one by default)."""

from __future__ import annotations

from pathlib import Path

from ray import serve

from rlhf_ray.cluster import connect
from rlhf_ray.config import RunConfig
from serve.app import build_app, stage_folders

APP_NAME = "rlhf-ray"


def start(run_dir: Path, cfg: RunConfig) -> str:
    """Deploy every stage model of `run_dir`; returns the API's base URL once all are ready."""
    app = build_app(run_dir, cfg.serve)  # refuses a run without models before Ray starts
    connect(cfg.cluster)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def served_models(run_dir: Path, cfg: RunConfig) -> list[str]:
    return list(stage_folders(run_dir, cfg.serve))
