"""PPO scaled out on real Ray and real vLLM engines: policy and value in groups of two, the
reference in two replicas, two engines fed by the streamed weight sync; a checkpoint of two FSDP
workers resumes in one, and a killed policy worker costs only the steps since the checkpoint.
The object-store sync, kept for where no group can be formed, puts the same weights in (the
resumed run uses it)."""

import json
import os
import signal
import threading
import time

import psutil
import pytest
import ray

from rlhf_ray.config import load_config
from rlhf_ray.run import data_files
from rlhf_ray.rl.ppo import PPOTrainer, run_ppo, run_steps
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


def test_ppo_with_two_of_every_role_runs_to_the_end_and_every_engine_holds_the_policy(
        tiny_policy_dir, tiny_reward_dir, tmp_path):
    cfg = make_run(tmp_path, tiny_policy_dir, tiny_reward_dir, *SCALED, "ppo.eval_every=2",
                   "ppo.resources.policy.strategy=fsdp", "ppo.policy_lr=3e-3", "ppo.max_new_tokens=12")
    files = data_files(cfg)
    logged: list[str] = []
    trainer = PPOTrainer(cfg, files["rl"], files["rl_eval"], log=logged.append)
    try:
        assert any("streamed over gloo from the policy's rank 0 to 2 engine workers in buckets of "
                   "0.05 MB" in m for m in logged)
        before = greedy(trainer, engine=0)
        run_steps(trainer, cfg.run_dir / "metrics" / "ppo.jsonl", logged.append)
        want = hf_greedy_with_policy_weights(trainer)  # the policy's weights, gathered
        assert want != before  # the steps changed the policy, and every engine has it
        assert greedy(trainer, engine=0) == want and greedy(trainer, engine=1) == want
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics" / "ppo.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[-1]["weight_version"] == 2
    assert all(r["sync_gb_per_s"] > 0 and r["value_skipped_updates"] == 0 for r in rows[1:])

    # The checkpoint of two FSDP policy workers, resumed by one (weights through the object store).
    resumed = load_config(REPO / "configs" / "test.yaml", [
        f"runs_dir={tmp_path}", "ppo.steps=3", "ppo.policy_lr=3e-3", "ppo.max_new_tokens=12",
        "ppo.weight_sync=object_store", "ppo.resources.placement_timeout_s=20"])
    logged.clear()
    trainer = PPOTrainer(resumed, files["rl"], files["rl_eval"], log=logged.append)
    try:
        assert trainer.start_step == 2 and any("resumed from" in m for m in logged)
        assert "weight sync: through Ray's object store (ppo.weight_sync: object_store)" in logged
        assert greedy(trainer) == want  # the engine started from the checkpoint's policy
        metrics = trainer.step(2)
        assert metrics["weight_version"] == 3 and metrics["sync_gb_per_s"] == 0  # nothing streamed
        assert greedy(trainer) == hf_greedy_with_policy_weights(trainer) != want
    finally:
        trainer.close()


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
    cfg = make_run(tmp_path, tiny_policy_dir, tiny_reward_dir, *SCALED[:1], *SCALED[4:6], "ppo.steps=4",
                   "ppo.checkpoint_every=2", "ppo.eval_every=4", "ppo.estimator=grpo",
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
    assert any("a PPO role worker died (policy worker" in m and "step_000002" in m for m in logged), logged
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics" / "ppo.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5))  # none lost, none repeated
    assert {r["resumed_from"] for r in rows[3:]} == {2}
    assert rows[-1]["weight_version"] == 4
