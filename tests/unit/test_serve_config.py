"""serve/serve_config.yaml is a valid Ray Serve config whose import path builds this run's app."""

import shutil
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from rlhf_ray.config import load_config, save_config
from serve.app import app_builder

REPO = Path(__file__).resolve().parents[2]


def test_the_serve_config_validates_against_rays_schema():
    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve" / "serve_config.yaml").read_text()))
    [app] = config.applications
    assert app.import_path == "serve.app:app_builder" and app.args == {"run": "runs/demo"}


def test_the_import_path_builds_the_app_of_a_run(tmp_path, tiny_policy_dir):
    cfg = load_config(REPO / "configs" / "test.yaml", [f"runs_dir={tmp_path}"])
    save_config(cfg, cfg.run_dir / "config.yaml")
    with pytest.raises(FileNotFoundError, match="no stage model to serve"):
        app_builder({"run": str(cfg.run_dir)})
    shutil.copytree(tiny_policy_dir, cfg.run_dir / "sft")
    assert app_builder({"run": str(cfg.run_dir)}) is not None
