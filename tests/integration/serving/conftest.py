"""The served app every test here talks to: one Serve app on a local Ray, with tiny models as a
run's base, sft, rlhf and reward stages, started once for the whole folder."""

import os
import shutil

import openai
import pytest
import ray
from ray import serve as ray_serve

from rlhf_ray.compare.store import Candidate, ComparisonStore
from rlhf_ray.config import load_config
from rlhf_ray.modeling import save_model
from rlhf_ray.tokenizer import load_tokenizer
from serve.run import start

from tests.served import KEY, KEY_ENV, QUESTION, REPO, chat_model, free_port


@pytest.fixture(scope="package")
def served(tiny_policy_dir, tiny_reward_dir, tmp_path_factory):
    """The app serving a run with base, sft, rlhf and reward; yields (url, run config). Each stage
    works on at most 2 requests and queues 2 more, so overload is easy to reach."""
    os.environ[KEY_ENV] = KEY
    cfg = load_config(REPO / "configs" / "test.yaml", [
        f"runs_dir={tmp_path_factory.mktemp('serve')}", f"serve.port={free_port()}",
        "serve.cpus_per_replica=0.25", f"serve.api_key_env={KEY_ENV}", "serve.max_body_bytes=8192",
        "serve.max_ongoing_requests=2", "serve.max_queued_requests=2"])
    shutil.copytree(tiny_policy_dir, cfg.run_dir / "base")
    shutil.copytree(tiny_reward_dir, cfg.run_dir / "reward")
    for stage in ("sft", "rlhf"):  # two chat stages, as a run has
        save_model(chat_model(tiny_policy_dir), load_tokenizer(tiny_policy_dir), cfg.run_dir / stage)
    ComparisonStore(cfg.run_dir / "compare").write_candidates([Candidate(  # answers to rank
        id="p0", prompt=QUESTION, responses=["Paris.", "The capital of France is Paris."])])
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False)
    yield start(cfg.run_dir, cfg), cfg
    ray_serve.shutdown()
    if started_here:
        ray.shutdown()


@pytest.fixture(scope="package")
def url(served):
    return served[0]


@pytest.fixture(scope="package")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


