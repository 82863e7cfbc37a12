"""Deploy the serve applications on a Ray cluster (an embedded local one by default).

They are deployed the way `serve deploy` does it, from a config: Serve builds each app once, by
`serve.app:app_builder` and `serve.app:stage_app_builder` (serve/deployment.py) from the run
folder, and each stage's folder is its deployment's user_config. Deploying again with one
stage's folder changed (or rewritten by a new export) changes only that deployment's
user_config, which Serve applies in place: that stage's replicas load the new model next to the
old one and drain the old one; nothing else restarts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray
from ray import serve as ray_serve
from ray.serve._private.api import serve_start
from ray.serve.schema import (
    ApplicationStatus,
    ServeApplicationSchema,
    ServeDeploySchema,
    ServeInstanceDetails,
)

from rlhf_ray.cluster import ResourcesError, bundle, connect, describe, joins_cluster, why_unplaceable
from rlhf_ray.compare.store import ComparisonStore
from rlhf_ray.config import RunConfig
from rlhf_ray.console import say
from rlhf_ray.plan import check_fits_here
from rlhf_ray.run import CHAT_MODELS, REWARD_MODEL, RunFolder
from serve.app import check_servable, folder_config, stage_folders
from serve.deployment import CHAT_APP, RANK_APP, App, deployment_name, stage_app
from serve.protocol import read_api_key


def deploy_config(run_dir: Path, cfg: RunConfig, chat: bool = True) -> ServeDeploySchema:
    """Serve's own config for this run: what `serve deploy` would be given. It holds the chat
    app and each chat stage's app (unless `chat` is False) and, when the run has comparisons to
    rank, the ranking page."""
    apps = chat_apps(run_dir, cfg) if chat else []
    compare = RunFolder(Path(run_dir)).compare
    if ComparisonStore(compare).has_candidates():
        apps.append(ServeApplicationSchema(
            name=RANK_APP.name, route_prefix=RANK_APP.route_prefix,
            import_path=RANK_APP.import_path,
            args={"folder": str(compare.resolve()),
                  "lease_s": cfg.compare.lease_s if cfg.compare else 600.0,
                  "api_key_env": cfg.serve.api_key_env},
            runtime_env=key_env(cfg)))
    return ServeDeploySchema(applications=apps,
                             http_options={"host": cfg.serve.host, "port": cfg.serve.port})


def key_env(cfg: RunConfig) -> dict:
    """The API key travels to the ingresses (the router, the stages, the ranking page), which
    read it from their environment."""
    if cfg.serve.api_key_env is None:
        return {}
    return {"env_vars": {cfg.serve.api_key_env: os.environ[cfg.serve.api_key_env]}}


def chat_apps(run_dir: Path, cfg: RunConfig) -> list[ServeApplicationSchema]:
    """The chat app (the router, and the reward model) and each chat stage's app. Each folder is
    its deployment's user_config, and only there: a folder that changes then changes only the
    user_config, which Serve applies in place (the apps' args stay the same)."""
    folders = stage_folders(run_dir, cfg.serve)
    settings = {k: v for k, v in cfg.serve.model_dump(mode="json").items() if k != "folders"}
    args = {"run": str(run_dir.resolve()), "serve": settings}

    def app(of: App, args: dict, deployments: dict[str, Path]) -> ServeApplicationSchema:
        return ServeApplicationSchema(
            name=of.name, route_prefix=of.route_prefix, import_path=of.import_path, args=args,
            runtime_env=key_env(cfg),
            deployments=[{"name": deployment_name(model), "user_config": folder_config(folder)}
                         for model, folder in deployments.items()])

    chat = app(CHAT_APP, {**args, "stages": sorted(folders)},
               {m: f for m, f in folders.items() if m == REWARD_MODEL})
    return [chat] + [app(stage_app(stage), {**args, "stage": stage}, {stage: folder})
                     for stage, folder in sorted(folders.items()) if stage in CHAT_MODELS]


def start(run_dir: Path, cfg: RunConfig, chat: bool = True) -> str:
    """Deploy (or update) every stage model of `run_dir` (with `chat` False: only the ranking
    page); returns the base URL once all are running. A first deploy that cannot come up is
    removed again, with the reason."""
    run_dir = Path(run_dir)
    if chat:
        folders = check_servable(run_dir, cfg.serve)  # a run without models, or its key: here
    else:
        read_api_key(cfg.serve.api_key_env)
    connect(cfg.cluster)
    replica = bundle(cfg.serve.cpus_per_replica, cfg.serve.gpus_per_replica)
    if chat and not joins_cluster(cfg.cluster):
        if reason := why_unplaceable([replica]):
            raise ResourcesError(f"a serve replica asks for {describe(replica)}{reason}")
        check_fits_here(cfg, "serve", next(f for st, f in folders.items() if st in CHAT_MODELS))
    client = serve_start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    config = deploy_config(run_dir, cfg, chat)
    if not config.applications:
        raise FileNotFoundError(f"{run_dir / 'compare'}: no candidates to rank; sample them "
                                "first (rlhf-ray compare-data)")
    names = [app.name for app in config.applications]
    first_deploy = [n for n in names if n not in ray_serve.status().applications]
    # Deploying a config removes the apps it leaves out: keep the others as they were deployed.
    running = ServeInstanceDetails(**client.get_serve_details()).applications
    config.applications += [app.deployed_app_config for name, app in running.items()
                            if name not in names and app.deployed_app_config is not None]
    client.deploy_apps(config)
    try:
        wait_running(names, cfg.serve.start_timeout_s, replica)
    except ResourcesError:
        for name in first_deploy:  # nothing was serving before: leave nothing half-started
            ray_serve.delete(name, _blocking=False)
        raise
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def wait_running(names: list[str], timeout_s: float, replica: dict[str, float]) -> None:
    """Until the apps run with every deployment healthy, saying every 30 s what it waits for; a
    failed deploy raises Serve's reason."""
    start = time.monotonic()
    said = 0.0
    while True:
        status = ray_serve.status().applications
        apps = [status.get(name) for name in names]
        deployments = {n: d for app in apps if app for n, d in app.deployments.items()}
        if all(app is not None and app.status == ApplicationStatus.RUNNING for app in apps) and all(
                d.status == "HEALTHY" for d in deployments.values()):
            return
        for app in apps:
            if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
                reasons = [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message]
                raise RuntimeError("serving failed to deploy: " + "\n".join([app.message, *reasons]))
        waited = time.monotonic() - start
        if waited >= said + 30 or waited >= timeout_s:
            said = waited
            pending = sorted(name for name, d in deployments.items() if d.status != "HEALTHY")
            message = (f"serving waiting {waited:.0f}s for {', '.join(pending) or 'the app'} "
                       f"(each replica {describe(replica)}); the cluster has "
                       f"{describe(ray.cluster_resources())}{why_unplaceable([replica])}")
            if waited >= timeout_s:
                raise ResourcesError(f"{message}; gave up after serve.start_timeout_s="
                                     f"{timeout_s:g}")
            say(f"[serve] {message}")
        time.sleep(0.5)


def served_models(run_dir: Path, cfg: RunConfig) -> list[str]:
    return list(stage_folders(run_dir, cfg.serve))
