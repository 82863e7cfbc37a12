"""The apps assembled from a run folder: the chat app (the router of serve/ingress.py, and the
reward model) and one app per chat stage (its deployment of serve/deployments.py).
`app_builder` and `stage_app_builder` are the import paths Serve's configs name
(serve/deployment.py); `check_servable` says what is wrong with a run without building anything.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ray import serve as ray_serve

from rlhf_ray.cluster import ACTOR_ENV
from rlhf_ray.config import ServeConfig, load_config
from rlhf_ray.run import CHAT_MODELS, REWARD_MODEL, RunFolder
from serve.deployment import ROUTER, deployment_name
from serve.deployments import RewardModel, StageModel
from serve.ingress import Router
from serve.protocol import read_api_key

# The router only relays; the stage deployments' own limits (serve.max_ongoing_requests and
# serve.max_queued_requests) decide what is served, queued or answered 503.
ROUTER_MAX_ONGOING = 4096


def stage_folders(run_dir: Path, cfg: ServeConfig) -> dict[str, Path]:
    """The configured stages (chat stages and the reward model) with a complete model folder:
    the run's own, or the one `serve.folders` names."""
    run = RunFolder(Path(run_dir))
    folders = {stage: Path(cfg.folders.get(stage, run.model(stage))) for stage in cfg.stages}
    return {stage: folder for stage, folder in folders.items() if (folder / "config.json").is_file()}


def folder_config(folder: Path) -> dict[str, str]:
    """A deployment's user_config: the folder, and a digest of its files' sizes and times, so a
    new export into the same folder is a new config (Serve then reconfigures the replicas)."""
    if not folder.is_dir():
        return {"folder": str(folder.resolve())}
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns)
             for f in sorted(folder.iterdir()) if f.is_file()]
    return {"folder": str(folder.resolve()), "state": hashlib.sha256(repr(files).encode()).hexdigest()[:16]}


def check_servable(run_dir: Path, cfg: ServeConfig,
                   stages: list[str] | None = None) -> dict[str, Path]:
    """The folder of each deployment to make, or the reason the run cannot be served: no chat
    model, or the API key's variable unset. Nothing is built, so the deployer asks this first
    and Serve builds the app once, from the config.

    `stages` fixes which deployments exist (default: the stages whose folders are there); the
    deployer may then point any of them at another folder by overriding its user_config alone,
    which Serve applies in place."""
    found = stage_folders(Path(run_dir), cfg)
    run = RunFolder(Path(run_dir))
    folders = found if stages is None else {s: found.get(s, run.model(s)) for s in stages}
    if not any(stage in CHAT_MODELS for stage in folders):
        raise FileNotFoundError(f"{run_dir}: no stage model to serve (none of {list(CHAT_MODELS)} "
                                "has a complete folder); run the pipeline first")
    read_api_key(cfg.api_key_env)  # refuse here, with the reason, rather than in a replica
    return folders


def serve_settings(args: dict[str, Any]) -> ServeConfig:
    """A builder's serve settings: `args["serve"]` when given (rlhf-ray serve passes them),
    otherwise the run's config.yaml's."""
    if "serve" in args:
        return ServeConfig.model_validate(args["serve"])
    return load_config(RunFolder(Path(args["run"])).config).serve


def build_app(run_dir: Path, cfg: ServeConfig, stages: list[str] | None = None) -> ray_serve.Application:
    """The chat app: the router over the chat stages' apps (each built by build_stage_app), and
    the reward model, its folder its deployment's user_config."""
    folders = check_servable(run_dir, cfg, stages)
    reward = None
    if REWARD_MODEL in folders:
        reward = RewardModel.options(
            name=deployment_name(REWARD_MODEL), user_config=folder_config(folders[REWARD_MODEL]),
            ray_actor_options={"num_cpus": cfg.cpus_per_replica, "runtime_env": ACTOR_ENV},
            graceful_shutdown_timeout_s=cfg.drain_timeout_s,
        ).bind()
    return Router.options(
        name=ROUTER, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=ROUTER_MAX_ONGOING,
        graceful_shutdown_timeout_s=cfg.drain_timeout_s,
    ).bind([stage for stage in folders if stage in CHAT_MODELS], reward, cfg.api_key_env,
           cfg.max_body_bytes)


def build_stage_app(folder: Path, stage: str, cfg: ServeConfig) -> ray_serve.Application:
    """A chat stage's own app: its deployment, `folder` its user_config, answering at /<stage>."""
    if stage not in CHAT_MODELS:
        raise ValueError(f"{stage!r} is not a chat stage; those are {list(CHAT_MODELS)}")
    return StageModel.options(
        name=deployment_name(stage), user_config=folder_config(folder),
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica,
                           "runtime_env": ACTOR_ENV},
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        # The HTTP proxy refuses what the queue cannot take with a 503 and this Retry-After.
        backpressure_config={"retry_after_s": 1},
        graceful_shutdown_timeout_s=cfg.drain_timeout_s,
        autoscaling_config={"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                            "target_ongoing_requests": cfg.target_ongoing_requests,
                            "upscale_delay_s": cfg.upscale_delay_s,
                            "downscale_delay_s": cfg.downscale_delay_s,
                            "look_back_period_s": cfg.look_back_period_s},
    ).bind(stage, cfg.max_ongoing_requests, cfg.kv_cache.model_dump(), cfg.drain_timeout_s,
           cfg.stream_interval_ms / 1000, cfg.api_key_env, cfg.max_body_bytes)


def app_builder(args: dict[str, Any]) -> ray_serve.Application:
    """The chat app of the run folder `args["run"]` (serve/serve_config.yaml's import_path);
    `args["stages"]` fixes the stages it routes to (see check_servable)."""
    return build_app(Path(args["run"]), serve_settings(args), args.get("stages"))


def stage_app_builder(args: dict[str, Any]) -> ray_serve.Application:
    """The app of stage `args["stage"]` of the run folder `args["run"]`: the run's own folder of
    that stage, or the one `serve.folders` names."""
    cfg = serve_settings(args)
    stage = args["stage"]
    folder = Path(cfg.folders.get(stage, RunFolder(Path(args["run"])).model(stage)))
    return build_stage_app(folder, stage, cfg)
