"""A PPO role run by two Ray actors in one torch.distributed group (gloo on this CPU) computes
what one worker computes: the same logprobs, values and scores row for row, and the same
parameters after an update (DDP and FSDP alike), however unevenly the rows split. A checkpoint
written by two workers resumes in one."""

import pytest
import ray
import torch

from rlhf_ray.cluster import ACTOR_ENV
from rlhf_ray.config import PPOConfig
from rlhf_ray.modeling import load_scalar_model, save_model
from rlhf_ray.rl.actors import PolicyActor, ReferenceActor, RewardActor, ValueActor
from rlhf_ray.rl.group import RoleGroup
from rlhf_ray.rl.roles import PolicyRole, ReferenceRole, RewardModelRole, ValueRole, pack_rollouts
from rlhf_ray.rl.rollout import Rollout

pytestmark = pytest.mark.integration

# 7 rows in mini-batches of 3: shares of 2+1, 2+1 and 1+0 rows (rank 1 idles on the last one)
PPO = PPOConfig(mini_batch_size=3, ppo_epochs=2, kl_mode="loss", kl_estimator="k3")
SEED = 11


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False)
    yield
    if started_here:
        ray.shutdown()


@pytest.fixture(scope="module")
def exp(tiny_tokenizer):
    """Seven rollouts of uneven lengths with advantages, old and reference logprobs filled."""
    g = torch.Generator().manual_seed(0)
    rollouts = []
    for i in range(7):
        prompt = torch.randint(3, 300, (3 + i % 3,), generator=g).tolist()
        response = torch.randint(3, 300, (2 + 2 * i % 5,), generator=g).tolist()
        rollouts.append(Rollout(prompt, response, [-1.0] * len(response), "stop", 0))
    exp = pack_rollouts(rollouts, tiny_tokenizer.pad_id, temperature=0.8)
    exp.advantages = torch.randn(exp.response_mask.shape, generator=g) * exp.response_mask
    exp.old_logprobs = exp.sample_logprobs + 0.1 * torch.randn(exp.response_mask.shape, generator=g)
    exp.ref_logprobs = exp.sample_logprobs - 0.2
    exp.values = torch.randn(exp.response_mask.shape, generator=g)
    exp.returns = torch.randn(exp.response_mask.shape, generator=g)
    return exp


def group(actor_class, workers: int, **kwargs) -> RoleGroup:
    options = [{"num_cpus": 0.5, "runtime_env": ACTOR_ENV}] * workers
    return RoleGroup.launch("role", actor_class, options, threads=1, **kwargs).join()


def assert_same_state(got: dict, want: dict, tolerance: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst < tolerance, f"parameters differ by up to {worst:.2e}"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_two_worker_policy_update_equals_the_one_worker_update(strategy, exp, tiny_policy_dir):
    alone = PolicyRole(tiny_policy_dir, lr=1e-3, device="cpu", threads=1)
    before = alone.logprobs(exp)
    expected_stats = alone.update(exp, PPO, kl_coef=0.1, seed=SEED)
    expected = alone.state_dict()

    pair = group(PolicyActor, 2, model_dir=tiny_policy_dir, lr=1e-3, strategy=strategy)
    try:
        exp_ref = ray.put(exp)
        assert torch.allclose(pair.rows("logprobs", exp_ref).get(), before, atol=1e-5)
        stats = pair.each("update", exp_ref, PPO, 0.1, SEED).get()
        got = pair.each("state_dict").get()
    finally:
        pair.kill()

    assert_same_state(got, expected)
    assert stats["policy_skipped_updates"] == 0
    for key in ("policy_loss", "clip_fraction", "approx_kl", "entropy", "kl_loss", "policy_grad_norm"):
        assert stats[key] == pytest.approx(expected_stats[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_two_worker_value_update_equals_the_one_worker_update(strategy, exp, tiny_reward_dir):
    alone = ValueRole(tiny_reward_dir, lr=1e-3, device="cpu", threads=1)
    before = alone.values(exp)
    expected_loss = alone.update(exp, PPO, seed=SEED)["value_loss"]
    expected = {k: v.detach().clone() for k, v in alone.model.state_dict().items()}

    pair = group(ValueActor, 2, model_dir=tiny_reward_dir, lr=1e-3, strategy=strategy)
    try:
        exp_ref = ray.put(exp)
        assert torch.allclose(pair.rows("values", exp_ref).get(), before, atol=1e-5)
        loss = pair.each("update", exp_ref, PPO, SEED).get()["value_loss"]
        pair.each("save", tiny_reward_dir.parent / f"value-{strategy}").get()
    finally:
        pair.kill()

    saved = ValueRole(tiny_reward_dir.parent / f"value-{strategy}", lr=1e-3, device="cpu")
    assert_same_state(saved.model.state_dict(), expected)
    assert loss == pytest.approx(expected_loss, rel=1e-4)


@pytest.fixture(scope="module")
def likelihood_reward_dir(tiny_reward_dir, tiny_tokenizer):
    """The tiny reward model with a likelihood term: its score also reads the embeddings, which
    FSDP shards with the rest."""
    folder = tiny_reward_dir.parent / "reward-likelihood"
    save_model(load_scalar_model(tiny_reward_dir, likelihood_weight=1.0), tiny_tokenizer, folder)
    return folder


@pytest.mark.parametrize("strategy", ["replicate", "fsdp"])
def test_frozen_replicas_split_the_rows_and_compute_what_one_does(strategy, exp, tiny_policy_dir,
                                                                  likelihood_reward_dir):
    reference = ReferenceRole(tiny_policy_dir, device="cpu")
    reward = RewardModelRole(likelihood_reward_dir, device="cpu")
    references = group(ReferenceActor, 2, model_dir=tiny_policy_dir, strategy=strategy)
    rewards = group(RewardActor, 2, model_dir=likelihood_reward_dir, strategy=strategy)
    try:
        exp_ref = ray.put(exp)
        logprobs, scores = references.rows("logprobs", exp_ref), rewards.rows("score", exp_ref)
        assert torch.allclose(logprobs.get(), reference.logprobs(exp), atol=1e-5)
        assert torch.allclose(scores.get(), reward.score(exp), atol=1e-5)
        one_row = ray.put(exp.select(slice(0, 1)))  # rank 1 has no row: it idles, nothing hangs
        assert references.rows("logprobs", one_row).get().shape == (1, exp.response_mask.shape[1])
    finally:
        references.kill()
        rewards.kill()


def test_a_checkpoint_of_two_fsdp_workers_resumes_in_one(exp, tiny_policy_dir, tmp_path):
    pair = group(PolicyActor, 2, model_dir=tiny_policy_dir, lr=1e-3, strategy="fsdp")
    try:
        exp_ref = ray.put(exp)
        pair.each("update", exp_ref, PPO, 0.1, SEED).get()
        pair.each("save", tmp_path / "policy").get()
        pair.each("save_optimizer", tmp_path / "policy_optim.pt").get()
        pair.each("update", exp_ref, PPO, 0.1, SEED + 1).get()  # the step after the checkpoint
        expected = pair.each("state_dict").get()
    finally:
        pair.kill()

    resumed = PolicyRole(tmp_path / "policy", lr=1e-3, device="cpu")
    resumed.load_optimizer(tmp_path / "policy_optim.pt")
    resumed.update(exp, PPO, kl_coef=0.1, seed=SEED + 1)
    assert_same_state(resumed.state_dict(), expected)


def test_fsdp_under_bf16_gathers_bf16_shards_and_updates_as_float32_does(exp, tiny_policy_dir):
    """bf16 FSDP workers cast at the gather (no autocast copy of the model): their update points
    where the float32 one does."""
    start = PolicyRole(tiny_policy_dir, lr=1e-3, device="cpu").state_dict()
    alone = PolicyRole(tiny_policy_dir, lr=1e-3, device="cpu", threads=1)
    alone.update(exp, PPO, kl_coef=0.1, seed=SEED)
    pair = group(PolicyActor, 2, model_dir=tiny_policy_dir, lr=1e-3, strategy="fsdp",
                 precision="bfloat16")
    try:
        pair.each("update", ray.put(exp), PPO, 0.1, SEED).get()
        got = pair.each("state_dict").get()
    finally:
        pair.kill()
    step = lambda state: torch.cat([(state[k] - start[k]).flatten() for k in start])  # noqa: E731
    assert all(got[k].dtype == torch.float32 for k in got)  # the shards stay float32
    assert torch.nn.functional.cosine_similarity(step(got), step(alone.state_dict()), dim=0) > 0.9
