"""Deploy the serve application on a Ray cluster (an embedded local one by default).

It is deployed the way `serve deploy` does it, from a config: the app is built by
`serve.app:app_builder` from the run folder, and each stage's folder is its deployment's
user_config. Deploying again with one stage's folder changed (or rewritten by a new export)
changes only that deployment's user_config, which Serve applies in place: that stage's replicas
load the new model next to the old one and drain the old one; nothing else restarts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray
from ray import serve
from ray.serve._private.api import serve_start
from ray.serve.schema import ApplicationStatus, ServeApplicationSchema, ServeDeploySchema

from rlhf_ray.cluster import ResourcesError, connect, describe, joins_cluster, why_unplaceable
from rlhf_ray.config import RunConfig
from serve.app import build_app, deployment_name, folder_config, stage_folders

APP_NAME = "rlhf-ray"


def deploy_config(run_dir: Path, cfg: RunConfig) -> ServeDeploySchema:
    """Serve's own config for this run: what `serve deploy` would be given."""
    folders = stage_folders(run_dir, cfg.serve)
    settings = {k: v for k, v in cfg.serve.model_dump(mode="json").items() if k != "folders"}
    runtime_env = {}
    if cfg.serve.api_key_env is not None:  # the ingress reads the key from its environment
        runtime_env = {"env_vars": {cfg.serve.api_key_env: os.environ[cfg.serve.api_key_env]}}
    app = ServeApplicationSchema(
        name=APP_NAME, route_prefix="/", import_path="serve.app:app_builder",
        args={"run": str(run_dir.resolve()), "stages": sorted(folders),
              "serve": settings},
        runtime_env=runtime_env,
        deployments=[{"name": deployment_name(stage), "user_config": folder_config(folder)}
                     for stage, folder in sorted(folders.items())])
    return ServeDeploySchema(applications=[app],
                             http_options={"host": cfg.serve.host, "port": cfg.serve.port})


def start(run_dir: Path, cfg: RunConfig) -> str:
    """Deploy (or update) every stage model of `run_dir`; returns the API's base URL once all
    are running. A first deploy that cannot come up is removed again, with the reason."""
    run_dir = Path(run_dir)
    build_app(run_dir, cfg.serve)  # refuses a run without models, or without its key, before Ray
    config = deploy_config(run_dir, cfg)
    connect(cfg.cluster)
    replica = {"CPU": cfg.serve.cpus_per_replica} | (
        {"GPU": cfg.serve.gpus_per_replica} if cfg.serve.gpus_per_replica else {})
    if not joins_cluster(cfg.cluster) and (reason := why_unplaceable([replica])):
        raise ResourcesError(f"a serve replica asks for {describe(replica)}{reason}")
    client = serve_start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    first_deploy = APP_NAME not in serve.status().applications
    client.deploy_apps(config)
    try:
        wait_running(cfg.serve.start_timeout_s, replica)
    except ResourcesError:
        if first_deploy:  # nothing was serving before: leave nothing half-started behind
            serve.delete(APP_NAME, _blocking=False)
        raise
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def wait_running(timeout_s: float, replica: dict[str, float]) -> None:
    """Until the app runs with every deployment healthy, saying every 30 s what it waits for; a
    failed deploy raises Serve's reason."""
    start = time.monotonic()
    said = 0.0
    while True:
        app = serve.status().applications.get(APP_NAME)
        if app is not None:
            if app.status == ApplicationStatus.RUNNING and all(
                    d.status == "HEALTHY" for d in app.deployments.values()):
                return
            if app.status == ApplicationStatus.DEPLOY_FAILED:
                reasons = [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message]
                raise RuntimeError("serving failed to deploy: " + "\n".join([app.message, *reasons]))
        waited = time.monotonic() - start
        if waited >= said + 30 or waited >= timeout_s:
            said = waited
            pending = sorted(name for name, d in (app.deployments.items() if app else [])
                             if d.status != "HEALTHY")
            message = (f"serving waiting {waited:.0f}s for {', '.join(pending) or 'the app'} "
                       f"(each replica {describe(replica)}); the cluster has "
                       f"{describe(ray.cluster_resources())}{why_unplaceable([replica])}")
            if waited >= timeout_s:
                raise ResourcesError(f"{message}; gave up after serve.start_timeout_s="
                                     f"{timeout_s:g}")
            print(f"[serve] {message}", flush=True)
        time.sleep(0.5)


def served_models(run_dir: Path, cfg: RunConfig) -> list[str]:
    return list(stage_folders(run_dir, cfg.serve))
