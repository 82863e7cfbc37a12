"""The PPO roles on the tiny policy and reward folders: packing, logprobs, values, rewards."""

import pytest
import torch
from safetensors import safe_open

from rlhf_ray.config import PPOConfig
from rlhf_ray.data.records import Message
from rlhf_ray.modeling import load_policy, load_scalar_model
from rlhf_ray.rl.algorithms import masked_mean, value_loss
from rlhf_ray.rl.roles import (
    Experience,
    PolicyRole,
    ReferenceRole,
    RewardModelRole,
    ValueRole,
    pack_rollouts,
    sequence_logprobs,
)
from rlhf_ray.rl.rewards import FunctionReward, contains_answer
from rlhf_ray.rl.rollout import Rollout


def rollout(prompt: list[int], response: list[int], finish: str = "stop") -> Rollout:
    return Rollout(prompt_ids=prompt, response_ids=response, logprobs=[-0.5] * len(response),
                   finish_reason=finish, weight_version=0)


@pytest.fixture
def exp(tiny_tokenizer) -> Experience:
    """Three chat rollouts of different prompt and response lengths."""
    tok = tiny_tokenizer
    ask = lambda q: tok.render_prompt([Message(role="user", content=q)])  # noqa: E731
    rollouts = [
        rollout(ask("What is the capital of France?"), tok.encode("Paris.") + [tok.end_id]),
        rollout(ask("Capital of Peru?"), tok.encode("The capital of Peru is Lima."), "length"),
        rollout(ask("And Kenya, what is its capital city?"), tok.encode("Nairobi") + [tok.end_id]),
    ]
    return pack_rollouts(rollouts, tok.pad_id, temperature=1.0)


# --------------------------------------------------------------------------- packing


def test_pack_rollouts_by_hand():
    exp = pack_rollouts([rollout([1, 2, 3], [4, 5]), rollout([6], [7, 8, 9], "length")], pad_id=0,
                        temperature=0.7)
    assert exp.sequences.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert exp.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # column t predicts token t + 1: row 0 predicts 4, 5 at columns 2, 3; row 1 predicts 7, 8, 9
    assert exp.response_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert exp.sequences[:, 1:][exp.response_mask.bool()].tolist() == [4, 5, 7, 8, 9]
    assert exp.sample_logprobs.tolist() == [[0, 0, -0.5, -0.5], [-0.5, -0.5, -0.5, 0]]
    assert exp.finished.tolist() == [True, False]
    assert exp.old_logprobs is None and exp.advantages is None and exp.returns is None
    assert exp.temperature == 0.7 and exp.select(slice(0, 1)).temperature == 0.7


def test_pack_rollouts_rejects_mismatched_logprobs():
    bad = Rollout([1, 2], [3, 4], [-1.0], "stop", 0)
    with pytest.raises(ValueError, match="rollout 0"):
        pack_rollouts([bad], pad_id=0, temperature=1.0)


def test_mini_batches_cover_every_row_once(exp):
    exp.advantages = torch.arange(len(exp))[:, None].float().expand_as(exp.response_mask)
    batches = list(exp.mini_batches(2))
    assert [len(b) for b in batches] == [2, 1]
    rows = sorted(int(b.advantages[j, 0]) for b in batches for j in range(len(b)))
    assert rows == [0, 1, 2]


# --------------------------------------------------------------------------- policy and reference


def test_sequence_logprobs_matches_manual(tiny_policy_dir, exp):
    model = load_policy(tiny_policy_dir).eval()
    with torch.no_grad():
        logprobs = sequence_logprobs(model, exp.sequences, exp.attention_mask)
        tempered = sequence_logprobs(model, exp.sequences, exp.attention_mask, temperature=0.5)
        logits = model(input_ids=exp.sequences, attention_mask=exp.attention_mask).logits.float()
    B, T = exp.sequences.shape
    assert logprobs.shape == (B, T - 1) and logprobs.dtype == torch.float32
    logp, logp_half = torch.log_softmax(logits, -1), torch.log_softmax(logits / 0.5, -1)
    for i in range(B):
        for t in range(T - 1):
            token = exp.sequences[i, t + 1]
            assert logprobs[i, t].item() == pytest.approx(logp[i, t, token].item(), abs=1e-5)
            assert tempered[i, t].item() == pytest.approx(logp_half[i, t, token].item(), abs=1e-5)


def test_every_role_scores_the_tempered_distribution_the_rollouts_came_from(tiny_policy_dir, exp):
    """Sampled at T = 0.5: the policy's and the reference's logprobs are log_softmax(logits / 0.5),
    not those of T = 1 (which PPO's ratio and KL would otherwise silently use)."""
    policy = PolicyRole(tiny_policy_dir, lr=1e-3, device="cpu")
    reference = ReferenceRole(tiny_policy_dir, device="cpu")
    at_one = policy.logprobs(exp)
    exp.temperature = 0.5
    model = load_policy(tiny_policy_dir).eval()
    with torch.no_grad():
        expected = sequence_logprobs(model, exp.sequences, exp.attention_mask, temperature=0.5)
    torch.testing.assert_close(policy.logprobs(exp), expected)
    torch.testing.assert_close(reference.logprobs(exp), expected)
    assert not torch.allclose(at_one * exp.response_mask, expected * exp.response_mask)
    exp.temperature = 0.0
    with pytest.raises(ValueError, match="greedy"):
        policy.logprobs(exp)


def test_policy_matches_reference_before_update(tiny_policy_dir, exp):
    policy = PolicyRole(tiny_policy_dir, lr=1e-3, device="cpu")
    reference = ReferenceRole(tiny_policy_dir, device="cpu")
    torch.testing.assert_close(policy.logprobs(exp), reference.logprobs(exp))
    assert not any(p.requires_grad for p in reference.model.parameters())


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_policy_update_follows_the_advantage(tiny_policy_dir, exp, sign):
    torch.manual_seed(0)
    policy = PolicyRole(tiny_policy_dir, lr=1e-4, device="cpu")
    exp.old_logprobs = policy.logprobs(exp)
    exp.advantages = sign * exp.response_mask.float()
    stats = policy.update(exp, PPOConfig(mini_batch_size=3, clip_ratio=0.2, entropy_coef=0.01), 0.0)
    assert set(stats) == {"policy_loss", "clip_fraction", "dual_clip_fraction", "approx_kl",
                          "entropy", "kl_loss", "policy_grad_norm", "policy_skipped_updates",
                          "policy_nonfinite_streak"}
    assert stats["policy_grad_norm"] > 0 and stats["policy_skipped_updates"] == 0
    assert stats["clip_fraction"] == 0.0 and stats["approx_kl"] == pytest.approx(0.0, abs=1e-8)
    assert stats["policy_loss"] == pytest.approx(-sign, abs=1e-5)  # ratio 1 on the first step
    # the objective's direction: the mean logprob of the sampled response tokens
    before = masked_mean(exp.old_logprobs, exp.response_mask)
    after = masked_mean(policy.logprobs(exp), exp.response_mask)
    assert sign * (after - before) > 0, (before, after)


def test_a_non_finite_update_is_skipped_counted_and_leaves_the_weights(tiny_policy_dir, exp):
    policy = PolicyRole(tiny_policy_dir, lr=1e-3, device="cpu")
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    exp.old_logprobs = policy.logprobs(exp)
    exp.advantages = torch.full_like(exp.old_logprobs, float("nan")) * exp.response_mask
    stats = policy.update(exp, PPOConfig(mini_batch_size=2), 0.0)  # 2 mini-batches, both NaN
    assert stats["policy_skipped_updates"] == 2 and stats["policy_nonfinite_streak"] == 2
    assert stats["policy_loss"] == 0.0  # the means are over the updates taken: none
    for name, tensor in policy.model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)
    exp.advantages = exp.response_mask.float()  # a finite batch resets the streak
    stats = policy.update(exp, PPOConfig(mini_batch_size=3), 0.0)
    assert stats["policy_skipped_updates"] == 0 and stats["policy_nonfinite_streak"] == 0


def test_entropy_has_a_graph_only_when_it_is_in_the_loss(tiny_policy_dir, exp, monkeypatch):
    from rlhf_ray.rl import roles

    seen: list[bool] = []
    real = roles.entropy_from_logits
    monkeypatch.setattr(roles, "entropy_from_logits",
                        lambda logits: seen.append(logits.requires_grad) or real(logits))
    policy = PolicyRole(tiny_policy_dir, lr=1e-4, device="cpu")
    exp.old_logprobs, exp.advantages = policy.logprobs(exp), exp.response_mask.float()
    logged = policy.update(exp, PPOConfig(mini_batch_size=3), 0.0)["entropy"]
    used = policy.update(exp, PPOConfig(mini_batch_size=3, entropy_coef=0.01), 0.0)["entropy"]
    assert seen == [False, True]
    assert logged > 0 and used == pytest.approx(logged, rel=0.05)


def test_the_gradient_clip_and_kl_loss_come_from_the_config(tiny_policy_dir, exp, monkeypatch):
    clips: list[float] = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: clips.append(max_norm) or real(params, max_norm))
    policy = PolicyRole(tiny_policy_dir, lr=1e-4, device="cpu")
    exp.old_logprobs, exp.advantages = policy.logprobs(exp), exp.response_mask.float()
    exp.ref_logprobs = exp.old_logprobs - 0.1 * exp.response_mask
    cfg = PPOConfig(mini_batch_size=3, grad_clip=0.25, kl_mode="loss", kl_estimator="k2")
    stats = policy.update(exp, cfg, kl_coef=0.5)
    assert clips == [0.25]
    assert stats["kl_loss"] == pytest.approx(0.5 * 0.1**2, rel=1e-4)  # k2 of a 0.1 log-ratio


def test_policy_update_needs_advantages(tiny_policy_dir, exp):
    policy = PolicyRole(tiny_policy_dir, lr=1e-3, device="cpu")
    with pytest.raises(ValueError, match="old_logprobs, advantages"):
        policy.update(exp, PPOConfig(mini_batch_size=2), 0.0)


def test_policy_state_dict_has_the_folder_names(tiny_policy_dir):
    policy = PolicyRole(tiny_policy_dir, lr=1e-3, device="cpu")
    state = policy.state_dict()
    with safe_open(str(tiny_policy_dir / "model.safetensors"), "pt") as f:
        saved = {name: f.get_tensor(name) for name in f.keys()}
    assert set(saved) <= set(state)
    assert set(state) - set(saved) <= {"lm_head.weight"}  # tied to embed_tokens, not saved twice
    for name, tensor in saved.items():
        torch.testing.assert_close(state[name], tensor)


# --------------------------------------------------------------------------- value


def test_values_are_aligned_with_next_token_columns(tiny_reward_dir, exp):
    critic = ValueRole(tiny_reward_dir, lr=1e-3, device="cpu")
    values = critic.values(exp)
    B, T = exp.sequences.shape
    assert values.shape == (B, T - 1) == exp.response_mask.shape
    # the column before the first response token is the value of the prompt alone, which the
    # scalar model reads at the prompt's last token
    scalar = load_scalar_model(tiny_reward_dir).eval()
    for i in range(B):
        first = int(exp.response_mask[i].nonzero()[0])
        prompt = exp.sequences[i : i + 1, : first + 1]
        with torch.no_grad():
            expected = scalar(input_ids=prompt, attention_mask=torch.ones_like(prompt)).logits[0, 0]
        assert values[i, first].item() == pytest.approx(expected.item(), abs=1e-5)


def test_value_update_moves_values_toward_returns(tiny_reward_dir, exp):
    torch.manual_seed(0)
    critic = ValueRole(tiny_reward_dir, lr=1e-3, device="cpu")
    exp.values = critic.values(exp)
    exp.returns = (exp.values + 1.0) * exp.response_mask
    mask = exp.response_mask
    before = value_loss(exp.values, exp.values, exp.returns, mask, clip=10.0).item()
    stats = critic.update(exp, PPOConfig(mini_batch_size=3, ppo_epochs=3, value_clip=10.0))
    assert stats["value_loss"] == pytest.approx(before, rel=0.5)  # the mean over three steps
    after_values = critic.values(exp)
    after = value_loss(after_values, exp.values, exp.returns, mask, clip=10.0).item()
    assert after < before
    assert masked_mean(after_values - exp.values, mask) > 0


# --------------------------------------------------------------------------- rewards


def test_reward_model_scores_ignore_padding(tiny_reward_dir, exp):
    scores = RewardModelRole(tiny_reward_dir, device="cpu").score(exp)
    assert scores.shape == (len(exp),)
    scalar = load_scalar_model(tiny_reward_dir).eval()
    for i in range(len(exp)):
        n = int(exp.attention_mask[i].sum())
        ids = exp.sequences[i : i + 1, :n]
        with torch.no_grad():
            alone = scalar(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0]
        assert scores[i].item() == pytest.approx(alone.item(), abs=1e-5)


def test_ppo_scores_a_rollout_as_evaluation_scores_the_conversation(tiny_policy_dir, tiny_tokenizer, tmp_path):
    """With a likelihood weight the score reads the response's tokens: PPO's rollout (prompt ids,
    then the sampled ids ending with the stop token) and the same exchange as a conversation
    (/v1/score, the evaluation) mark the same tokens, so they get the same score."""
    from rlhf_ray.modeling import save_model, score_conversations

    tok = tiny_tokenizer
    torch.manual_seed(0)
    save_model(load_scalar_model(tiny_policy_dir, likelihood_weight=2.0), tok, tmp_path / "reward")
    question, answer = "Capital of Peru?", "The capital of Peru is Lima."
    exp = pack_rollouts([rollout(tok.render_prompt([Message(role="user", content=question)]),
                                 tok.encode(answer) + [tok.end_id]),
                         rollout(tok.render_prompt([Message(role="user", content="Kenya?")]),
                                 tok.encode("Nairobi") + [tok.end_id])], tok.pad_id, temperature=1.0)
    in_ppo = RewardModelRole(tmp_path / "reward", device="cpu").score(exp)
    model = load_scalar_model(tmp_path / "reward").eval()
    as_chat = score_conversations(model, tok, [[Message(role="user", content=question),
                                                Message(role="assistant", content=answer)],
                                               [Message(role="user", content="Kenya?"),
                                                Message(role="assistant", content="Nairobi")]])
    assert in_ppo.tolist() == pytest.approx(as_chat, abs=1e-4)


def test_reward_is_read_at_the_last_real_token_even_when_it_is_the_pad_id(tiny_reward_dir):
    """A response that ends with a token equal to pad_token_id (as when eos is the pad) is scored
    at that token, found from the attention mask; transformers' own pooling, which looks for
    the pad id, scores the token before it."""
    scalar = load_scalar_model(tiny_reward_dir).eval()
    pad = scalar.config.pad_token_id
    real = torch.tensor([[5, 6, 7, pad]])
    padded = Experience(torch.tensor([[5, 6, 7, pad, pad, pad]]), torch.tensor([[1, 1, 1, 1, 0, 0]]),
                        torch.zeros(1, 5), torch.tensor([True]), torch.zeros(1, 5))
    with torch.no_grad():
        hidden = scalar.model(input_ids=real, attention_mask=torch.ones_like(real)).last_hidden_state
        expected = scalar.score(hidden[:, -1]).item()
        pooled = scalar(input_ids=padded.sequences, attention_mask=padded.attention_mask).logits[0, 0]
    score = RewardModelRole(tiny_reward_dir, device="cpu").score(padded)
    assert score.item() == pytest.approx(expected, abs=1e-5)
    assert pooled.item() != pytest.approx(expected, abs=1e-3)  # what the old reading gave


def test_contains_answer():
    reward = FunctionReward(contains_answer)
    scores = reward.score(["It is Paris.", "It is Lyon.", "Paris"], ["Paris", "Paris", None])
    assert scores.tolist() == [1.0, 0.0, 0.0]
    assert scores.dtype == torch.float32


def test_function_reward_from_spec():
    reward = FunctionReward.from_spec("rlhf_ray.rl.rewards:contains_answer")
    assert reward.score(["a 42"], ["42"]).tolist() == [1.0]
    with pytest.raises(ValueError, match="module:function"):
        FunctionReward.from_spec("no_colon")


def _fails_on_second(text: str, truth: str | None) -> float:
    if text == "boom":
        raise KeyError("oops")
    return 1.0


@pytest.mark.parametrize("fn, match", [
    (_fails_on_second, r"_fails_on_second raised on response 1: KeyError"),
    (lambda text, truth: float("nan") if text == "boom" else 0.0,
     r"<lambda> returned nan for response 1"),
    (lambda text, truth: float("inf") if text == "boom" else 0.0, r"returned inf for response 1"),
    (lambda text, truth: "1.0" if text == "boom" else 0.0, r"returned '1.0' for response 1"),
])
def test_function_reward_errors_name_the_function_and_index(fn, match):
    with pytest.raises(ValueError, match=match):
        FunctionReward(fn).score(["fine", "boom"], [None, None])


def test_activation_checkpointing_recomputes_the_same_update(exp, tiny_policy_dir):
    exp.old_logprobs = exp.sample_logprobs
    exp.advantages = torch.linspace(-1, 1, exp.response_mask.numel()).view_as(exp.sample_logprobs)
    plain = PolicyRole(tiny_policy_dir, lr=1e-3, device="cpu")
    recomputed = PolicyRole(tiny_policy_dir, lr=1e-3, device="cpu", activation_checkpointing=True)
    for role in (plain, recomputed):
        role.update(exp, PPOConfig(mini_batch_size=2), 0.0, seed=3)
    want, got = plain.state_dict(), recomputed.state_dict()
    assert max((want[k] - got[k]).abs().max().item() for k in want) < 1e-6
    assert any((want[k] - load_policy(tiny_policy_dir).state_dict()[k]).abs().max() > 0 for k in want)
