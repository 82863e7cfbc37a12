"""PPO end to end on real Ray actors and a real vLLM engine, on the tiny models.

The trainer's engines must hold exactly the policy's weights after every sync (greedy rollouts
equal transformers' greedy decoding with the policy actor's weights), refuse to sample from stale
weights, survive an engine's death, fail a step on a bad reward by name, and resume a killed run
from its last checkpoint.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from rlhf_ray.config import load_config
from rlhf_ray.modeling import load_policy
from rlhf_ray.pipeline import make_demo_data
from rlhf_ray.run import data_files
from rlhf_ray.rl.ppo import PPOTrainer
from rlhf_ray.rl.rewards import FunctionReward
from rlhf_ray.rl.rollout import StaleWeightsError

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def make_run(root: Path, policy_dir: Path, reward_dir: Path, *overrides: str):
    """A test-config run whose sft/ and reward/ are the tiny fixtures, with the demo's RL prompts."""
    cfg = load_config(REPO / "configs" / "test.yaml", [f"runs_dir={root}", *overrides])
    shutil.copytree(policy_dir, cfg.run_dir / "sft")
    shutil.copytree(reward_dir, cfg.run_dir / "reward")
    make_demo_data(cfg)
    return cfg


@pytest.fixture(scope="module")
def trainer(tiny_policy_dir, tiny_reward_dir, tmp_path_factory):
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False)
    # A large learning rate, so that one step visibly changes the greedy replies.
    cfg = make_run(tmp_path_factory.mktemp("ppo"), tiny_policy_dir, tiny_reward_dir,
                   "ppo.policy_lr=3e-3", "ppo.max_new_tokens=12")
    files = data_files(cfg)
    logged: list[str] = []
    trainer = PPOTrainer(cfg, files["rl"], files["rl_eval"], log=logged.append)
    trainer.logged = logged
    yield trainer
    trainer.close()
    if started_here:
        ray.shutdown()


def greedy(trainer: PPOTrainer, engine: int | None = None) -> list[list[int]]:
    """Greedy replies to the eval prompts: spread over the engines, or all from one of them."""
    prompts = [p.ids for p in trainer.eval_prompts]
    if engine is not None:
        rollouts = ray.get(trainer.engines[engine].generate.remote(
            prompts, trainer.ppo.max_new_tokens, 0.0, 1.0, trainer.version))
        return [r.response_ids for r in rollouts]
    return [r.response_ids for r in trainer.generate(prompts, temperature=0.0, seed=0)]


def hf_greedy_with_policy_weights(trainer: PPOTrainer) -> list[list[int]]:
    model = load_policy(trainer.sft_dir).eval()
    model.load_state_dict(trainer.policy.each("state_dict").get())
    replies = []
    for prompt in trainer.eval_prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt.ids]), do_sample=False,
                                 max_new_tokens=trainer.ppo.max_new_tokens)
        replies.append(out[0, len(prompt.ids):].tolist())
    return replies


def test_a_step_trains_the_policy_and_syncs_its_exact_weights_into_the_engine(trainer):
    assert any("weight sync: streamed over gloo from the policy's rank 0 to 1 engine workers" in m
               for m in trainer.logged)
    before = greedy(trainer)
    assert before == hf_greedy_with_policy_weights(trainer)

    metrics = trainer.step(0)

    assert metrics["step"] == 1 and metrics["weight_version"] == trainer.version == 1
    for key in ("reward_mean", "reward_std", "kl", "entropy", "policy_loss", "value_loss",
                "clip_fraction", "approx_kl", "response_length", "truncated_fraction",
                "logprob_mismatch", "time_generate", "time_experience", "time_train", "time_sync",
                "sync_gb_per_s", "rollout_tokens_per_s"):
        assert torch.isfinite(torch.tensor(metrics[key])), key
    assert metrics["sync_gb_per_s"] > 0  # streamed, not through the object store
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy still equalled the reference
    assert metrics["logprob_mismatch"] < 0.05  # vLLM's sampling logprobs ~ the trainer's
    after = greedy(trainer)
    assert after != before  # the update changed the policy ...
    assert after == hf_greedy_with_policy_weights(trainer)  # ... and the engine has its weights


def test_an_engine_with_stale_weights_is_refused(trainer):
    trainer.version += 1  # the controller expects weights the engine never received
    try:
        with pytest.raises(StaleWeightsError, match=rf"holds weight version {trainer.version - 1}, "
                                                    rf"the caller expected version {trainer.version}"):
            greedy(trainer)
    finally:
        trainer.version -= 1


def test_a_dead_engine_is_restarted_with_the_current_weights(trainer):
    restarts = trainer.restarts_left
    version = trainer.version
    ray.kill(trainer.engines[0])

    metrics = trainer.step(version)

    assert trainer.restarts_left == restarts - 1
    assert any("rollout engine 0 died; restarting it with weight version" in m for m in trainer.logged)
    assert metrics["weight_version"] == version + 1
    assert greedy(trainer) == hf_greedy_with_policy_weights(trainer)


@pytest.mark.parametrize("bad, message", [
    (lambda text, truth: float("nan"), r"returned nan for response 0; expected a finite number"),
    (lambda text, truth: 1 / 0, r"raised on response 0: ZeroDivisionError"),
])
def test_a_bad_reward_function_fails_the_step_by_name_and_changes_nothing(trainer, bad, message):
    reward_model, version = trainer.reward_model, trainer.version
    trainer.reward_model, trainer.reward_fn = None, FunctionReward(bad)
    try:
        with pytest.raises(ValueError, match=message):
            trainer.step(version)
    finally:
        trainer.reward_model, trainer.reward_fn = reward_model, None
    assert trainer.version == version
    assert trainer.step(version)["weight_version"] == version + 1  # still usable


def test_evaluation_reports_reward_kl_and_exact_match(trainer):
    result = trainer.evaluate()
    assert set(result) == {"eval_reward_greedy", "eval_length_greedy", "eval_exact_match",
                           "eval_reward_sampled", "eval_length_sampled", "eval_kl"}
    assert 0.0 <= result["eval_exact_match"] <= 1.0


# --------------------------------------------------------------------------- the CLI, killed and resumed


def ppo_command(cfg, steps: int) -> list[str]:
    return [sys.executable, "-m", "rlhf_ray.cli", "ppo", "--config", str(REPO / "configs" / "test.yaml"),
            "--set", f"runs_dir={cfg.runs_dir}", "--set", f"ppo.steps={steps}",
            "--set", "ppo.checkpoint_every=2", "--set", "ppo.eval_every=4",
            "--set", "ppo.estimator=grpo", "--set", "ppo.samples_per_prompt=2",
            "--set", "ppo.reward_source=function",
            "--set", "ppo.reward_function=rlhf_ray.rl.rewards:contains_answer"]


def test_a_killed_ppo_run_resumes_from_its_last_checkpoint(tiny_policy_dir, tiny_reward_dir, tmp_path):
    cfg = make_run(tmp_path, tiny_policy_dir, tiny_reward_dir)
    checkpoints = cfg.run_dir / "checkpoints" / "ppo"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.Popen(ppo_command(cfg, steps=40), cwd=REPO, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (checkpoints / "step_000002" / "state.json").exists():
            assert run.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-run
        run.wait()
    saved = sorted(p.name for p in checkpoints.glob("step_*") if (p / "state.json").exists())
    resumed_from = int(saved[-1].removeprefix("step_"))
    assert not (cfg.run_dir / "rlhf").exists()

    steps = resumed_from + 4
    done = subprocess.run(ppo_command(cfg, steps=steps), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {checkpoints / saved[-1]} (step {resumed_from}" in done.stdout
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics" / "ppo.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(steps + 1))  # each step once, step 0 the eval
    assert {r["resumed_from"] for r in rows[resumed_from + 1:]} == {resumed_from}
    assert rows[-1]["weight_version"] == steps
    assert (cfg.run_dir / "rlhf" / "model.safetensors").exists()
    state = json.loads((checkpoints / f"step_{steps:06d}" / "state.json").read_text())
    assert state["step"] == steps
    assert len(list(checkpoints.glob("step_*"))) == cfg.ppo.keep_checkpoints

