"""The PPO controller's plain parts: prompt loading and order, advantages, checkpoints, rewards."""

import json
import threading
from pathlib import Path
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from rlhf_ray.config import ConfigError, PPOConfig, load_config
from rlhf_ray.data.readers import RecordError
from rlhf_ray.data.records import Message
from rlhf_ray.report import ppo_before_after
from rlhf_ray.rl.ppo import (
    PPOTrainer,
    check_finite_updates,
    compute_advantages,
    latest_checkpoint,
    load_prompts,
    needs_policy_pass,
    step_prompts,
)
from rlhf_ray.rl.rewards import HTTPReward
from rlhf_ray.rl.roles import pack_rollouts
from rlhf_ray.rl.rollout import Rollout

CONFIGS = Path(__file__).parents[2] / "configs"


def write_prompts(path, prompts):
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return path


# --------------------------------------------------------------------------- prompts


def test_prompts_are_rendered_as_chats_with_their_ground_truth(tmp_path, tiny_tokenizer):
    path = write_prompts(tmp_path / "rl.jsonl", [{"prompt": "Capital of Peru?", "ground_truth": "Lima"}])
    [prompt] = load_prompts([path], tiny_tokenizer, max_new_tokens=8, max_seq_len=128, kind="rl")
    assert prompt.ids == tiny_tokenizer.render_prompt([Message(role="user", content="Capital of Peru?")])
    assert (prompt.text, prompt.ground_truth) == ("Capital of Peru?", "Lima")


def test_a_prompt_without_room_for_the_response_is_named_by_file_and_line(tmp_path, tiny_tokenizer):
    path = write_prompts(tmp_path / "rl.jsonl", [{"prompt": "short"}, {"prompt": "long " * 200}])
    with pytest.raises(RecordError, match=r"rl\.jsonl:2: prompt: \d+ tokens \+ ppo.max_new_tokens 8 "
                                          r"exceed the model's context of 128"):
        load_prompts([path], tiny_tokenizer, max_new_tokens=8, max_seq_len=128, kind="rl")


def test_an_empty_prompt_set_is_an_error(tmp_path, tiny_tokenizer):
    empty = tmp_path / "rl.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"rl\.jsonl: no records \(the file is empty\)"):
        load_prompts([empty], tiny_tokenizer, 8, 128, "rl")
    with pytest.raises(ValueError, match=r"no rl prompt files: set data.rl"):
        load_prompts([], tiny_tokenizer, 8, 128, "rl")


def test_step_prompts_are_a_pure_function_of_seed_and_step_covering_each_epoch():
    steps = [step_prompts(10, 4, seed=0, step=s) for s in range(5)]  # 20 prompts = 2 epochs
    assert steps == [step_prompts(10, 4, seed=0, step=s) for s in range(5)]
    flat = sum(steps, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # each epoch its own order
    assert step_prompts(10, 4, seed=1, step=0) != steps[0]
    assert len(step_prompts(3, 8, seed=0, step=0)) == 8  # more per step than prompts: wraps


# --------------------------------------------------------------------------- advantages


def experience(samples: int = 2):
    rollouts = [Rollout([5, 6], [7, 8, 1], [-0.1, -0.2, -0.3], "stop", 0),
                Rollout([5], [9, 9], [-1.0, -1.0], "length", 0)] * (samples // 2)
    exp = pack_rollouts(rollouts, pad_id=0, temperature=1.0)
    exp.policy_logprobs = exp.sample_logprobs.clone()
    exp.old_logprobs = exp.policy_logprobs
    exp.ref_logprobs = exp.sample_logprobs - 0.5 * exp.response_mask  # KL 0.5 per token
    exp.values = torch.zeros_like(exp.old_logprobs)
    return exp


def test_gae_advantages_are_whitened_over_response_tokens_with_kl_in_the_reward():
    exp = experience()
    stats = compute_advantages(exp, torch.tensor([1.0, 0.0]), PPOConfig(lam=1.0), kl_coef=0.1)
    mask = exp.response_mask.bool()
    assert stats["kl"] == pytest.approx((3 * 0.5 + 2 * 0.5) / 2)
    assert exp.advantages[mask].mean().abs() < 1e-5 and (exp.advantages[~mask] == 0).all()
    # Returns with gamma = lam = 1 and zero values: the rest of the response's rewards, the score at the end.
    assert exp.returns[0, 1:4].tolist() == pytest.approx([1 - 0.15, 1 - 0.1, 1 - 0.05])
    assert exp.returns[1, 0:2].tolist() == pytest.approx([-0.1, -0.05])


def test_unfinished_responses_are_penalised_and_scores_clipped():
    exp = experience()
    cfg = PPOConfig(unfinished_penalty=-1.0, reward_clip=0.5, kl_coef=0.0)
    stats = compute_advantages(exp, torch.tensor([2.0, 0.0]), cfg, kl_coef=0.0)
    assert stats["shaped_reward_mean"] == pytest.approx((0.5 - 0.5) / 2)


def test_centred_scores_make_the_advantages_blind_to_the_scores_offset():
    """A value model with a new head predicts about 0 while a likelihood-weighted reward model's
    scores sit near -13: with lam < 1 a token's advantage is then the score discounted by the
    tokens left, so after whitening the early tokens of a long reply look good for its length.
    Centred on the batch's mean (before the clip), the offset no longer reaches the advantages."""
    def advantages(scores, center):
        exp = experience()
        compute_advantages(exp, torch.tensor(scores), PPOConfig(lam=0.5), kl_coef=0.0, center=center)
        return exp

    near_zero, far_below = advantages([1.0, 0.0], True), advantages([-13.0, -14.0], True)
    assert torch.allclose(near_zero.advantages, far_below.advantages, atol=1e-6)
    # By hand: the scores become +0.5 and -0.5 (inside the clip of 10), the returns with zero
    # values and lam 0.5 halve per token back from the end.
    assert far_below.returns[0, 1:4].tolist() == pytest.approx([0.125, 0.25, 0.5])
    assert far_below.returns[1, 0:2].tolist() == pytest.approx([-0.25, -0.5])
    # Uncentred, the clip flattens both to -10 and the whitened advantages follow length alone.
    uncentred = advantages([-13.0, -14.0], False)
    assert not torch.allclose(uncentred.advantages, far_below.advantages, atol=1e-3)
    assert uncentred.returns[0, 3] == uncentred.returns[1, 1] == pytest.approx(-10.0)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_estimators_give_every_token_its_responses_advantage(estimator):
    exp = experience(samples=4)  # two groups of two: [stop, length], [stop, length]
    cfg = PPOConfig(estimator=estimator, samples_per_prompt=2, kl_coef=0.0)
    compute_advantages(exp, torch.tensor([1.0, 0.0, 0.0, 1.0]), cfg, kl_coef=0.0)
    mask = exp.response_mask.bool()
    per_response = [exp.advantages[i][mask[i]].unique().tolist() for i in range(4)]
    assert all(len(a) == 1 for a in per_response)
    signs = [a[0] > 0 for a in per_response]
    assert signs == [True, False, False, True]
    assert exp.returns is None


@pytest.mark.parametrize("kl_coef", [0.0, 0.1, 0.2])
def test_grpo_with_equal_scores_moves_only_by_the_kl_penalty_scaled_by_kl_coef(kl_coef):
    """A group whose scores are all equal has no preference to learn: the advantages are the KL
    penalty still to come, times kl_coef (not the KL's noise standardised to unit scale)."""
    exp = experience(samples=2)  # one group: a 3-token and a 2-token response, KL 0.5 per token
    cfg = PPOConfig(estimator="grpo", samples_per_prompt=2, kl_coef=kl_coef)
    compute_advantages(exp, torch.tensor([1.0, 1.0]), cfg, kl_coef=kl_coef)
    mask = exp.response_mask.bool()
    assert exp.advantages[0][mask[0]].tolist() == pytest.approx([-kl_coef * 1.5, -kl_coef * 1.0,
                                                                 -kl_coef * 0.5])
    assert exp.advantages[1][mask[1]].tolist() == pytest.approx([-kl_coef * 1.0, -kl_coef * 0.5])
    assert (exp.advantages[~mask] == 0).all()


def test_grpo_normalises_the_scores_alone_then_subtracts_the_kl():
    exp = experience(samples=2)
    compute_advantages(exp, torch.tensor([3.0, 1.0]), PPOConfig(estimator="grpo", samples_per_prompt=2),
                       kl_coef=0.1)
    # scores 3, 1: mean 2, std (Bessel) sqrt(2) -> +-1/sqrt(2) (over std + 1e-6), then the KL to go
    z = 1 / (2**0.5 + 1e-6)
    assert exp.advantages[0, 1:4].tolist() == pytest.approx([z - 0.15, z - 0.10, z - 0.05])
    assert exp.advantages[1, 0:2].tolist() == pytest.approx([-z - 0.10, -z - 0.05])


def test_with_the_kl_as_a_loss_the_advantages_carry_no_kl():
    exp = experience(samples=2)
    cfg = PPOConfig(estimator="grpo", samples_per_prompt=2, kl_mode="loss", kl_estimator="k3")
    stats = compute_advantages(exp, torch.tensor([1.0, 1.0]), cfg, kl_coef=0.5)
    assert (exp.advantages == 0).all()
    assert stats["kl"] == pytest.approx((1.5 + 1.0) / 2)  # still reported (k1)


def test_the_kl_penalty_uses_the_trainers_logprobs_never_the_engines():
    """old_logprobs 'rollout': the ratio uses vLLM's logprobs, but the KL is the trainer's policy
    against the reference; at step 0 (policy = reference) it is 0, however far vLLM's numbers are."""
    exp = experience()
    exp.ref_logprobs = exp.policy_logprobs.clone()  # the policy is still the reference
    exp.sample_logprobs = exp.policy_logprobs - 0.3 * exp.response_mask  # bf16 vLLM differs
    exp.old_logprobs = exp.sample_logprobs
    stats = compute_advantages(exp, torch.tensor([0.0, 0.0]), PPOConfig(old_logprobs="rollout"), 0.1)
    assert stats["kl"] == 0.0
    assert needs_policy_pass(PPOConfig(old_logprobs="rollout"))  # kl_coef 0.02 in the reward
    assert needs_policy_pass(PPOConfig(old_logprobs="rollout", kl_coef=0.0, kl_target=1.0))
    assert not needs_policy_pass(PPOConfig(old_logprobs="rollout", kl_coef=0.0))
    assert not needs_policy_pass(PPOConfig(old_logprobs="rollout", kl_mode="loss", kl_estimator="k3"))


def test_repeated_non_finite_updates_stop_the_run_with_the_role_named():
    check_finite_updates({"policy_nonfinite_streak": 2.0, "value_nonfinite_streak": 0.0}, 3, 7)
    with pytest.raises(FloatingPointError, match=r"step 7: the value's last 3 updates .* skipped "
                                                 r"\(ppo.max_nonfinite_updates=3\)"):
        check_finite_updates({"policy_nonfinite_streak": 0.0, "value_nonfinite_streak": 3.0}, 3, 7)


@pytest.mark.parametrize("settings, message", [
    (["ppo.kl_estimator=k3"], "kl_estimator 'k3' with kl_mode 'reward'"),
    (["ppo.kl_mode=loss", "ppo.kl_estimator=k1"], "kl_estimator 'k1' with kl_mode 'loss'"),
    (["ppo.top_p=0.9"], "top_p 0.9 < 1: nucleus sampling truncates"),
    (["ppo.clip_ratio_c=0.5"], "clip_ratio_c: Input should be greater than 1"),
])
def test_settings_that_would_bias_ppo_are_refused_by_name(settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "test.yaml", settings)
    assert load_config(CONFIGS / "test.yaml", ["ppo.kl_mode=loss", "ppo.kl_estimator=k3"])


def test_rollout_engines_pick_their_own_threads():
    with pytest.raises(ValueError, match="rollout.threads: vLLM binds its own CPU threads"):
        PPOConfig(resources={"rollout": {"threads": 2}})


def test_group_estimators_need_a_group():
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        PPOConfig(estimator="grpo", samples_per_prompt=1)


# --------------------------------------------------------------------------- checkpoints and report


def test_latest_checkpoint_ignores_unfinished_folders(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for name in ["step_000002", "step_000010", ".step_000012.tmp-1", "step_000011"]:
        (tmp_path / name).mkdir()
    for name in ["step_000002", "step_000010"]:
        (tmp_path / name / "state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000010"


def test_before_after_compares_the_first_and_last_evaluation(tmp_path):
    path = tmp_path / "ppo.jsonl"
    rows = [{"step": 0, "eval_reward_greedy": 0.1, "eval_kl": 0.0},
            {"step": 1, "reward_mean": 0.3},
            {"step": 2, "reward_mean": 0.4, "eval_reward_greedy": 0.5, "eval_kl": 1.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ppo_before_after(path) == {"reward_greedy": {"before": 0.1, "after": 0.5},
                                      "kl": {"before": 0.0, "after": 1.5},
                                      "steps": {"before": 0, "after": 2}}


def test_the_trainer_checks_its_inputs_before_starting_any_actor(tmp_path, tiny_policy_dir):
    cfg = load_config("configs/test.yaml", [f"runs_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=r"sft: model folder not found"):
        PPOTrainer(cfg, [], [])
    import shutil

    shutil.copytree(tiny_policy_dir, cfg.run_dir / "sft")
    rl = write_prompts(tmp_path / "rl.jsonl", [{"prompt": "Capital of Peru?"}])
    cfg = load_config("configs/test.yaml", [f"runs_dir={tmp_path}", "ppo.reward_source=function",
                                            "ppo.reward_function=rlhf_ray.rl.rewards:nothing"])
    with pytest.raises(ValueError, match=r"rlhf_ray.rl.rewards has no function 'nothing'"):
        PPOTrainer(cfg, [rl], [])


# --------------------------------------------------------------------------- HTTP scorer


class Scorer(BaseHTTPRequestHandler):
    answer: object = None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answer = type(self).answer
        if answer == "echo-lengths":
            answer = {"scores": [float(len(r)) for r in body["responses"]]}
        data = json.dumps(answer).encode()
        self.send_response(200 if answer != "error" else 500)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def scorer_url():
    server = HTTPServer(("127.0.0.1", 0), Scorer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/score"
    server.shutdown()


def test_http_reward_posts_responses_and_reads_scores(scorer_url):
    Scorer.answer = "echo-lengths"
    scores = HTTPReward(scorer_url).score(["ab", "abcd"], ["x", None], ["p1", "p2"])
    assert scores.tolist() == [2.0, 4.0]


@pytest.mark.parametrize("answer, message", [
    ({"scores": [1.0]}, r"expected \{\"scores\": \[2 numbers\]\}"),
    ({"scores": [1.0, "high"]}, r"returned 'high' for response 1; expected a number"),
    ({"scores": [1.0, float("nan")]}, r"returned nan for response 1; expected a finite number"),
    ("error", r"answered HTTP 500"),
])
def test_http_reward_rejects_bad_answers_by_name(scorer_url, answer, message):
    Scorer.answer = answer
    with pytest.raises(ValueError, match=message):
        HTTPReward(scorer_url).score(["ab", "abcd"])


def test_an_unreachable_scorer_is_named():
    with pytest.raises(ValueError, match=r"reward scorer http://127.0.0.1:9/score unreachable"):
        HTTPReward("http://127.0.0.1:9/score", timeout_s=2).score(["x"])


def test_the_value_model_starts_from_the_reward_model_only_when_its_head_is_the_whole_score(
        tmp_path, tiny_policy_dir, tiny_reward_dir, tiny_tokenizer):
    """A likelihood-weighted reward model's head is only part of its score: a value model started
    from it would steer GAE by what the head alone likes, so it starts from sft/ instead."""
    from rlhf_ray.modeling import load_scalar_model, save_model
    from rlhf_ray.rl.ppo import value_start

    assert value_start(tiny_reward_dir, tiny_policy_dir) == tiny_reward_dir
    save_model(load_scalar_model(tiny_reward_dir, likelihood_weight=2.0), tiny_tokenizer, tmp_path / "reward")
    assert value_start(tmp_path / "reward", tiny_policy_dir) == tiny_policy_dir
    assert value_start(tmp_path / "no-reward", tiny_policy_dir) == tiny_policy_dir  # reward_source function/http


def test_scores_are_centred_by_default_exactly_when_the_value_head_is_new(tiny_policy_dir, tiny_reward_dir):
    from rlhf_ray.rl.ppo import centers_scores

    assert centers_scores(PPOConfig(), tiny_policy_dir, tiny_policy_dir)
    assert not centers_scores(PPOConfig(), tiny_reward_dir, tiny_policy_dir)
    assert not centers_scores(PPOConfig(estimator="grpo", samples_per_prompt=2), tiny_policy_dir, tiny_policy_dir)
    assert centers_scores(PPOConfig(center_scores=True), tiny_reward_dir, tiny_policy_dir)
    assert not centers_scores(PPOConfig(center_scores=False), tiny_policy_dir, tiny_policy_dir)
