"""Ray Serve's configs for this project (serve/serve_config.yaml, deploy/rayservice.yaml, and the
one `rlhf-ray serve` deploys) name the apps serve/deployment.py names, and build this run's app."""

import importlib
import os
import shutil
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from rlhf_ray.compare.store import Candidate, ComparisonStore
from rlhf_ray.config import ConfigError, load_config, save_config
from serve.app import app_builder, check_servable, stage_app_builder, stage_folders
from serve.deployment import CHAT_APP, RANK_APP, stage_app
from serve.run import deploy_config

REPO = Path(__file__).resolve().parents[2]


def rays_config(path: str) -> ServeDeploySchema:
    config = yaml.safe_load((REPO / path).read_text())
    if config.get("kind") == "RayService":
        config = yaml.safe_load(config["spec"]["serveConfigV2"])
    return ServeDeploySchema.model_validate(config)


def named(apps: list) -> list[tuple[str, str, str]]:
    return [(a.name, a.route_prefix, a.import_path) for a in apps]


@pytest.mark.parametrize("path, stages", [("serve/serve_config.yaml", ["base", "sft", "rlhf"]),
                                          ("deploy/rayservice.yaml", ["sft", "rlhf"])])
def test_rays_own_configs_name_the_apps_as_serve_deployment_does(path, stages):
    chat, *stage_apps, rank = rays_config(path).applications
    assert named([chat, *stage_apps, rank]) == named([CHAT_APP, *map(stage_app, stages), RANK_APP])
    for app in (chat, *stage_apps, rank):  # each import path is a function that exists
        module, function = app.import_path.split(":")
        assert callable(getattr(importlib.import_module(module), function))
    assert [a.args for a in stage_apps] == [{"run": chat.args["run"], "stage": s} for s in stages]
    assert chat.args["run"] + "/compare" == rank.args["folder"]


def test_the_deploy_config_names_the_apps_as_serve_deployment_does(tmp_path, tiny_policy_dir, tiny_reward_dir):
    cfg = load_config(REPO / "configs" / "test.yaml", [f"runs_dir={tmp_path}"])
    for stage in ("sft", "rlhf"):
        shutil.copytree(tiny_policy_dir, cfg.run_dir / stage)
    shutil.copytree(tiny_reward_dir, cfg.run_dir / "reward")
    ComparisonStore(cfg.run_dir / "compare").write_candidates(
        [Candidate(id="p0", prompt=[{"role": "user", "content": "Hi?"}], responses=["a", "b"])])
    apps = deploy_config(cfg.run_dir, cfg).applications
    assert named(apps) == named([CHAT_APP, stage_app("rlhf"), stage_app("sft"), RANK_APP])
    # The router's app holds the reward model; each stage's app, the stage's deployment.
    assert [[d.name for d in a.deployments] for a in apps[:3]] == [["reward"], ["stage-rlhf"], ["stage-sft"]]


def test_a_run_is_checked_for_serving_without_building_the_app(tmp_path, tiny_policy_dir, monkeypatch):
    cfg = load_config(REPO / "configs" / "test.yaml", [f"runs_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="no stage model to serve"):
        check_servable(cfg.run_dir, cfg.serve)
    shutil.copytree(tiny_policy_dir, cfg.run_dir / "sft")
    assert check_servable(cfg.run_dir, cfg.serve) == {"sft": cfg.run_dir / "sft"}
    monkeypatch.delenv("RLHF_TEST_KEY", raising=False)
    keyed = load_config(REPO / "configs" / "test.yaml", [f"runs_dir={tmp_path}",
                                                           "serve.api_key_env=RLHF_TEST_KEY"])
    with pytest.raises(ValueError, match="'RLHF_TEST_KEY', but that environment variable is not set"):
        check_servable(keyed.run_dir, keyed.serve)


def test_the_ranking_page_is_deployed_when_the_run_has_comparisons_to_rank(tmp_path, tiny_policy_dir):
    cfg = load_config(REPO / "configs" / "test.yaml", [f"runs_dir={tmp_path}", "compare.lease_s=60"])
    shutil.copytree(tiny_policy_dir, cfg.run_dir / "sft")
    assert [a.name for a in deploy_config(cfg.run_dir, cfg).applications] == ["rlhf-ray", "rlhf-ray-sft"]
    ComparisonStore(cfg.run_dir / "compare").write_candidates(
        [Candidate(id="p0", prompt=[{"role": "user", "content": "Hi?"}], responses=["a", "b"])])
    *chat, rank = deploy_config(cfg.run_dir, cfg).applications
    assert rank.name == "rlhf-ray-rank" and rank.args["lease_s"] == 60
    assert rank.args["folder"] == str((cfg.run_dir / "compare").resolve())
    assert [a.name for a in deploy_config(cfg.run_dir, cfg, chat=False).applications] == ["rlhf-ray-rank"]


def test_the_import_path_builds_the_app_of_a_run(tmp_path, tiny_policy_dir):
    cfg = load_config(REPO / "configs" / "test.yaml", [f"runs_dir={tmp_path}"])
    save_config(cfg, cfg.run_dir / "config.yaml")
    with pytest.raises(FileNotFoundError, match="no stage model to serve"):
        app_builder({"run": str(cfg.run_dir)})
    shutil.copytree(tiny_policy_dir, cfg.run_dir / "sft")
    assert app_builder({"run": str(cfg.run_dir)}) is not None


def user_configs(run_dir: Path, overrides: list[str] = ()) -> dict[str, dict]:
    """Each deployment's user_config in the deploy config of `run_dir` (what Serve compares)."""
    cfg = load_config(REPO / "configs" / "test.yaml", [f"runs_dir={run_dir.parent}", f"name={run_dir.name}",
                                                         *overrides])
    apps = deploy_config(run_dir, cfg).applications
    return {d.name: d.user_config for app in apps for d in app.deployments}


def test_a_stage_is_served_from_the_folder_the_config_names(tmp_path, tiny_policy_dir, tiny_reward_dir):
    run = tmp_path / "run"
    for stage in ("sft", "rlhf"):
        shutil.copytree(tiny_policy_dir, run / stage)
    shutil.copytree(tiny_reward_dir, run / "reward")
    shutil.copytree(tiny_policy_dir, tmp_path / "other" / "rlhf")
    cfg = load_config(REPO / "configs" / "test.yaml", [f"serve.folders.rlhf={tmp_path / 'other' / 'rlhf'}"]).serve
    assert stage_folders(run, cfg) == {"sft": run / "sft", "rlhf": tmp_path / "other" / "rlhf",
                                       "reward": run / "reward"}


def test_the_deploy_config_builds_the_app_with_the_runs_settings(tmp_path, tiny_policy_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_policy_dir, run / "sft")
    cfg = load_config(REPO / "configs" / "test.yaml", [f"runs_dir={tmp_path}", "name=run",
                                                         "serve.max_queued_requests=3", "serve.stages=[sft]"])
    chat, sft = deploy_config(run, cfg).applications
    assert chat.args["stages"] == ["sft"] and sft.args["serve"]["max_queued_requests"] == 3
    router = app_builder(chat.args)._bound_deployment  # what Serve's build task runs
    assert router.init_args[0] == ["sft"]
    stage = stage_app_builder(sft.args)._bound_deployment
    assert stage.name == "stage-sft" and stage._deployment_config.max_queued_requests == 3
    assert stage._deployment_config.user_config["folder"] == str(run / "sft")


def test_a_stage_scales_between_its_replica_bounds_with_the_configured_delays(tmp_path, tiny_policy_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_policy_dir, run / "sft")
    cfg = load_config(REPO / "configs" / "test.yaml", [
        f"runs_dir={tmp_path}", "name=run", "serve.stages=[sft]", "serve.min_replicas=1",
        "serve.max_replicas=3", "serve.target_ongoing_requests=2", "serve.upscale_delay_s=1",
        "serve.downscale_delay_s=5", "serve.look_back_period_s=12"])
    _, sft = deploy_config(run, cfg).applications
    scaling = stage_app_builder(sft.args)._bound_deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 2)
    assert (scaling.upscale_delay_s, scaling.downscale_delay_s, scaling.look_back_period_s) == (1, 5, 12)


def test_a_look_back_window_shorter_than_serves_load_reports_is_refused():
    with pytest.raises(ConfigError, match=r"serve.look_back_period_s: Input should be greater than 10 \(got 2\)"):
        load_config(REPO / "configs" / "test.yaml", ["serve.look_back_period_s=2"])


def test_only_a_moved_or_rewritten_stage_gets_a_new_user_config(tmp_path, tiny_policy_dir, tiny_reward_dir):
    run = tmp_path / "run"
    for stage in ("base", "sft", "rlhf"):
        shutil.copytree(tiny_policy_dir, run / stage)
    shutil.copytree(tiny_reward_dir, run / "reward")
    shutil.copytree(tiny_policy_dir, tmp_path / "elsewhere")
    first = user_configs(run)
    assert set(first) == {"stage-base", "stage-sft", "stage-rlhf", "reward"}
    assert user_configs(run) == first  # deploying again changes nothing

    moved = user_configs(run, [f"serve.folders.rlhf={tmp_path / 'elsewhere'}"])
    assert {d for d in first if moved[d] != first[d]} == {"stage-rlhf"}
    assert moved["stage-rlhf"]["folder"] == str(tmp_path / "elsewhere")

    weights = run / "sft" / "model.safetensors"  # a new export lands in the same folder
    weights.write_bytes(weights.read_bytes())
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    rewritten = user_configs(run)
    assert {d for d in first if rewritten[d] != first[d]} == {"stage-sft"}


def test_rays_serve_is_imported_under_an_alias_beside_our_serve_package():
    """`from ray import serve` inside the package `serve` would shadow one with the other."""
    for path in [*(REPO / "serve").glob("*.py"), *(REPO / "tests").rglob("*.py"), *(REPO / "rlhf_ray").rglob("*.py")]:
        lines = path.read_text().splitlines()
        assert "from ray import serve" not in lines and "import ray.serve" not in lines, path


def test_a_stage_app_is_built_for_a_chat_stage_only(tmp_path, tiny_policy_dir):
    cfg = load_config(REPO / "configs" / "test.yaml", [f"runs_dir={tmp_path}"])
    save_config(cfg, cfg.run_dir / "config.yaml")
    shutil.copytree(tiny_policy_dir, cfg.run_dir / "base")
    built = stage_app_builder({"run": str(cfg.run_dir), "stage": "base"})._bound_deployment
    assert built.name == "stage-base" and built.init_args[0] == "base"
    with pytest.raises(ValueError, match="'reward' is not a chat stage"):
        stage_app_builder({"run": str(cfg.run_dir), "stage": "reward"})
