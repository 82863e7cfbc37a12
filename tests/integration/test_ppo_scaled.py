"""PPO scaled out on real Ray and real vLLM engines: policy and value in groups of two, the
reference in two replicas, two engines fed by the streamed weight sync; a checkpoint of two FSDP
workers resumes in one, and a killed policy worker costs only the steps since the checkpoint.
The object-store sync, kept for where no group can be formed, puts the same weights in."""

import json
import os
import signal
import threading
import time

import psutil
import pytest
import ray

from rlhf_ray.config import load_config
from rlhf_ray.pipeline import data_files
from rlhf_ray.rl.ppo import PPOTrainer, run_ppo
from tests.integration.test_ppo import REPO, greedy, hf_greedy_with_policy_weights, make_run

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def local_ray():
    """A Ray of this test's own, so that the only PPO actors in it are the test's."""
    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()

# --------------------------------------------------------------------------- scaled out

# Two of everything on a 2-CPU Ray: the bundles must add up to at most 2 CPUs.
SCALED = ["ppo.resources.policy.num_workers=2", "ppo.resources.value.num_workers=2",
          "ppo.resources.reference.num_replicas=2", "ppo.num_rollout_engines=2",
          "ppo.resources.rollout.num_cpus=0.3", "ppo.resources.policy.num_cpus=0.25",
          "ppo.resources.value.num_cpus=0.125", "ppo.sync_bucket_mb=0.05",
          "ppo.resources.placement_timeout_s=20"]


def test_ppo_scaled_out_syncs_every_engine_and_its_checkpoint_resumes_in_one_worker(
        tiny_policy_dir, tiny_reward_dir, tmp_path):
    for strategy in ("fsdp", "ddp"):  # fsdp writes the checkpoint, one ddp worker resumes it
        overrides = [*SCALED, f"ppo.resources.policy.strategy={strategy}",
                     "ppo.policy_lr=3e-3", "ppo.max_new_tokens=12"]
        if strategy == "ddp":
            overrides = [o for o in overrides if "num_workers" not in o]
        cfg = (make_run(tmp_path, tiny_policy_dir, tiny_reward_dir, *overrides)
               if strategy == "fsdp" else
               load_config(REPO / "configs" / "test.yaml", [f"runs_dir={tmp_path}", *overrides]))
        files = data_files(cfg)
        logged: list[str] = []
        trainer = PPOTrainer(cfg, files["rl"], files["rl_eval"], log=logged.append)
        try:
            assert any("streamed over gloo from the policy's rank 0 to 2 engine workers in "
                       "buckets of 0.05 MB" in m for m in logged)
            step = trainer.start_step
            if strategy == "ddp":
                assert step == 1 and any("resumed from" in m for m in logged)
            before = greedy(trainer, engine=0)
            metrics = trainer.step(step)
            assert metrics["weight_version"] == step + 1
            want = hf_greedy_with_policy_weights(trainer)
            assert want != before  # the step changed the policy, and every engine has it
            assert greedy(trainer, engine=0) == want and greedy(trainer, engine=1) == want
            trainer.save_checkpoint(step + 1)
        finally:
            trainer.close()


def test_the_object_store_sync_puts_the_same_weights_into_the_engine(tiny_policy_dir, tiny_reward_dir,
                                                                     tmp_path):
    cfg = make_run(tmp_path, tiny_policy_dir, tiny_reward_dir, "ppo.weight_sync=object_store",
                   "ppo.policy_lr=3e-3", "ppo.max_new_tokens=12")
    files = data_files(cfg)
    logged: list[str] = []
    blob = PPOTrainer(cfg, files["rl"], files["rl_eval"], log=logged.append)
    try:
        assert "weight sync: through Ray's object store (ppo.weight_sync: object_store)" in logged
        before = greedy(blob)
        assert blob.step(0)["sync_gb_per_s"] == 0  # nothing streamed
        assert greedy(blob) != before and greedy(blob) == hf_greedy_with_policy_weights(blob)
    finally:
        blob.close()


def policy_worker_pids() -> list[int]:
    """The processes of this test's Ray (started by it, so its descendants) that host a policy
    worker: Ray titles an actor's process 'ray::PolicyRole...'."""
    pids = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.cmdline() and child.cmdline()[0].startswith("ray::PolicyRole"):
                pids.append(child.pid)
        except psutil.NoSuchProcess:  # exited while we looked
            pass
    return pids


def test_a_killed_policy_worker_recreates_the_roles_from_the_last_checkpoint(
        tiny_policy_dir, tiny_reward_dir, tmp_path):
    cfg = make_run(tmp_path, tiny_policy_dir, tiny_reward_dir, *SCALED[:1], *SCALED[4:6], "ppo.steps=6",
                   "ppo.checkpoint_every=2", "ppo.eval_every=6", "ppo.estimator=grpo",
                   "ppo.samples_per_prompt=2", "ppo.reward_source=function",
                   "ppo.reward_function=rlhf_ray.rl.rewards:contains_answer")
    checkpoint = cfg.run_dir / "checkpoints" / "ppo" / "step_000002" / "state.json"
    killed: list[int] = []

    def kill_a_policy_worker() -> None:
        while not checkpoint.exists():
            time.sleep(0.05)
        killed.append(policy_worker_pids()[-1])
        os.kill(killed[-1], signal.SIGKILL)

    killer = threading.Thread(target=kill_a_policy_worker, daemon=True)
    killer.start()
    logged: list[str] = []
    files = data_files(cfg)
    run_ppo(cfg, files["rl"], files["rl_eval"], log=logged.append)
    assert killed, "the policy worker was never killed"
    assert any("a PPO role worker died" in m and "step_000002" in m for m in logged), logged
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics" / "ppo.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(7))  # none lost, none repeated
    assert {r["resumed_from"] for r in rows[3:]} == {2}
    assert rows[-1]["weight_version"] == 6
