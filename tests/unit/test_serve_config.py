"""serve/serve_config.yaml is a valid Ray Serve config whose import path builds this run's app."""

import os
import shutil
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from rlhf_ray.compare.store import Candidate, ComparisonStore
from rlhf_ray.config import load_config, save_config
from serve.app import app_builder, stage_folders
from serve.run import deploy_config

REPO = Path(__file__).resolve().parents[2]


def test_the_serve_config_validates_against_rays_schema():
    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve" / "serve_config.yaml").read_text()))
    app, rank = config.applications
    assert app.import_path == "serve.app:app_builder" and app.args == {"run": "runs/demo"}
    assert rank.import_path == "serve.rank:app_builder" and rank.route_prefix == "/rank"


def test_the_ranking_page_is_deployed_when_the_run_has_comparisons_to_rank(tmp_path, tiny_policy_dir):
    cfg = load_config(REPO / "configs" / "test.yaml", [f"runs_dir={tmp_path}", "compare.lease_s=60"])
    shutil.copytree(tiny_policy_dir, cfg.run_dir / "sft")
    assert [a.name for a in deploy_config(cfg.run_dir, cfg).applications] == ["rlhf-ray"]
    ComparisonStore(cfg.run_dir / "compare").write_candidates(
        [Candidate(id="p0", prompt=[{"role": "user", "content": "Hi?"}], responses=["a", "b"])])
    chat, rank = deploy_config(cfg.run_dir, cfg).applications
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
    app = deploy_config(run_dir, cfg).applications[0]
    return {d.name: d.user_config for d in app.deployments}


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
    [app] = deploy_config(run, cfg).applications
    assert app.args["stages"] == ["sft"] and app.args["serve"]["max_queued_requests"] == 3
    built = app_builder(app.args)  # what Serve's build task runs
    [stage] = built._bound_deployment.init_args[0].values()
    assert stage._bound_deployment._deployment_config.max_queued_requests == 3


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
