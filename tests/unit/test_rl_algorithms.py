"""The math of PPO/GRPO/RLOO: every expected value is worked out by hand here, not with the code."""

import math

import pytest
import torch

from rlhf_ray.rl.algorithms import (
    KLController,
    clip_rewards,
    entropy_from_logits,
    gae,
    group_advantages,
    kl_loss,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    returns_to_go,
    token_rewards,
    truncated_is_weights,
    unfinished_penalty,
    value_loss,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(actual, expected):
    assert torch.allclose(actual.double(), torch.as_tensor(expected, dtype=torch.float64),
                          atol=1e-9), (actual, expected)


# --------------------------------------------------------------------------- masked statistics


def test_masked_mean_over_everything_and_along_each_axis():
    x = t([1, 2, 3], [4, 5, 6])
    mask = t([1, 1, 0], [1, 0, 0])
    close(masked_mean(x, mask), 7 / 3)  # (1 + 2 + 4) / 3
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    close(masked_mean(x, mask, dim=0), [2.5, 2.0, 0.0])  # the last column has no real entry: 0


def test_whiten_gives_mean_0_variance_1_over_masked_entries_only():
    x = t([1, 2, 3, 100], [5, -7, 0, 0])
    mask = t([1, 1, 1, 0], [1, 0, 0, 0])
    # real entries 1, 2, 3, 5: mean 2.75, population variance
    # (1.75^2 + 0.75^2 + 0.25^2 + 2.25^2) / 4 = (3.0625 + 0.5625 + 0.0625 + 5.0625) / 4 = 2.1875
    std = math.sqrt(2.1875)
    w = masked_whiten(x, mask)
    close(w, t([-1.75 / std, -0.75 / std, 0.25 / std, 0], [2.25 / std, 0, 0, 0]))
    real = w[mask.bool()]
    close(real.mean(), 0.0)
    close((real**2).mean(), 1.0)


def test_whiten_without_shift_keeps_the_mean():
    x = t([1, 2, 3, 100], [5, -7, 0, 0])
    mask = t([1, 1, 1, 0], [1, 0, 0, 0])
    std = math.sqrt(2.1875)
    w = masked_whiten(x, mask, shift_mean=False)
    close(w[mask.bool()], [-1.75 / std + 2.75, -0.75 / std + 2.75, 0.25 / std + 2.75, 2.25 / std + 2.75])
    close(w[mask.bool()].mean(), 2.75)


# --------------------------------------------------------------------------- KL and rewards


def test_k1_is_the_log_ratio_positive_where_the_policy_likes_the_token_more():
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    close(kl_penalty(logp, ref, "k1"), [0.5, -1.0])


def test_k3_by_hand():
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    # log r = ref - logp = [-0.5, 1]; k3 = (r - 1) - log r
    close(kl_penalty(logp, ref, "k3"), [math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1])


def test_k3_is_never_negative_and_zero_for_equal_policies():
    g = torch.Generator().manual_seed(0)
    logp, ref = -3 * torch.rand(1000, generator=g), -3 * torch.rand(1000, generator=g)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    close(kl_penalty(logp, logp, "k3"), torch.zeros(1000))
    close(kl_penalty(logp, logp, "k1"), torch.zeros(1000))


def test_k2_by_hand():
    close(kl_penalty(t([0.0, -1.0]), t([-0.5, 0.0]), "k2"), [0.125, 0.5])


def test_unknown_kl_estimator_is_refused():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(t([0.0]), t([0.0]), "k4")


def test_token_rewards_penalise_every_real_token_and_add_the_score_at_the_last():
    scores = t(1.0, 2.0)
    kl = t([0.1, 0.2, 0.3], [0.5, -0.5, 9.0])
    mask = t([1, 1, 1], [1, 1, 0])
    # row 0: -0.1 * [0.1, 0.2, 0.3] + [0, 0, 1]; row 1: -0.1 * [0.5, -0.5] + [0, 2], padding 0
    close(token_rewards(scores, kl, 0.1, mask), t([-0.01, -0.02, 0.97], [-0.05, 2.05, 0.0]))


def test_token_rewards_find_the_last_response_token_after_a_prompt():
    kl = t([0.0, 0.1, 0.2, 0.0], [0.0, 0.0, 0.3, 0.0])
    mask = t([0, 1, 1, 0], [0, 0, 1, 0])  # prompts of 1 and 2 columns, then padding
    close(token_rewards(t(1.0, 2.0), kl, 0.1, mask), t([0, -0.01, 0.98, 0], [0, 0, 1.97, 0]))
    # A row without response tokens gets nothing.
    close(token_rewards(t(5.0), t([0.1, 0.1]), 0.1, t([0, 0])), t([0.0, 0.0]))


def test_clip_rewards():
    close(clip_rewards(t(-20, -3, 0, 5, 11), 10.0), [-10, -3, 0, 5, 10])


def test_unfinished_penalty_only_touches_responses_that_did_not_finish():
    finished = torch.tensor([True, False, True])
    close(unfinished_penalty(t(1, 2, 3), finished, -1.0), [1, 1, 3])


# --------------------------------------------------------------------------- GAE


def test_gae_three_tokens_by_hand():
    rewards, values, mask = t([-0.1, 0.0, 1.0]), t([0.5, 0.4, 0.8]), t([1, 1, 1])
    # gamma = 1, lam = 0.95, and V = A = 0 after the last token:
    # t=2: delta = 1.0 + 0   - 0.8 =  0.2;  A2 = 0.2
    # t=1: delta = 0.0 + 0.8 - 0.4 =  0.4;  A1 = 0.4  + 0.95 * 0.2  = 0.59
    # t=0: delta = -0.1 + 0.4 - 0.5 = -0.2; A0 = -0.2 + 0.95 * 0.59 = 0.3605
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(adv, t([0.3605, 0.59, 0.2]))
    close(ret, t([0.3605 + 0.5, 0.59 + 0.4, 0.2 + 0.8]))


def test_gae_with_lam_1_is_the_discounted_return_minus_the_value():
    rewards, values, mask = t([-0.1, 0.0, 1.0]), t([0.5, 0.4, 0.8]), t([1, 1, 1])
    # gamma = 0.5: G2 = 1, G1 = 0 + 0.5 * 1 = 0.5, G0 = -0.1 + 0.5 * 0.5 = 0.15
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    close(adv, t([0.15 - 0.5, 0.5 - 0.4, 1 - 0.8]))
    close(ret, t([0.15, 0.5, 1.0]))


def test_gae_ignores_padded_positions():
    # row 0 is the 3-token case above padded to 5 with junk rewards and values; row 1 fills the width
    rewards = t([-0.1, 0.0, 1.0, 3.0, -4.0], [0.0, 0.0, 0.0, 0.0, 1.0])
    values = t([0.5, 0.4, 0.8, 7.0, 9.0], [0.0, 0.0, 0.0, 0.0, 0.0])
    mask = t([1, 1, 1, 0, 0], [1, 1, 1, 1, 1])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(adv[0], [0.3605, 0.59, 0.2, 0, 0])
    close(ret[0], [0.8605, 0.99, 1.0, 0, 0])
    # row 1: a single reward of 1 at the end, values 0: A_t = 0.95^(4 - t)
    close(adv[1], [0.95**4, 0.95**3, 0.95**2, 0.95, 1.0])


# --------------------------------------------------------------------------- group baselines


def test_grpo_group_of_three_by_hand():
    # group 1: [1, 2, 6], mean 3, deviations [-2, -1, 3], sample variance (4 + 1 + 9) / 2 = 7
    # group 2: [5, 5, 5], no spread: all advantages 0
    adv = group_advantages(t(1, 2, 6, 5, 5, 5), group_size=3, method="grpo")
    s = math.sqrt(7) + 1e-6
    close(adv, [-2 / s, -1 / s, 3 / s, 0, 0, 0])


def test_rloo_subtracts_the_mean_of_the_other_samples():
    # 1 - (2 + 6) / 2 = -3;  2 - (1 + 6) / 2 = -1.5;  6 - (1 + 2) / 2 = 4.5
    adv = group_advantages(t(1, 2, 6, 5, 5, 5), group_size=3, method="rloo")
    close(adv, [-3, -1.5, 4.5, 0, 0, 0])


def test_groups_are_laid_out_one_after_the_other():
    # groups of 2: [1, 3] and [10, 20]; leave-one-out of a pair is just the difference
    close(group_advantages(t(1, 3, 10, 20), 2, "rloo"), [-2, 2, -10, 10])


@pytest.mark.parametrize("scores, size, method", [(t(1, 2, 3), 1, "grpo"), (t(1, 2, 3), 2, "rloo"),
                                                  (t(1, 2), 2, "ppo")])
def test_group_advantages_refuse_impossible_groups(scores, size, method):
    with pytest.raises(ValueError):
        group_advantages(scores, size, method)


# --------------------------------------------------------------------------- PPO policy loss

# clip 0.2, old logp 0, so ratio = exp(logp). Per token: ratio, A, -min(r*A, clip(r)*A), clipped?
#   1.1, +1:  -min(1.1, 1.1)   = -1.1   inside the range
#   1.5, +1:  -min(1.5, 1.2)   = -1.2   clipped (the gain is capped)
#   1.5, -1:  -min(-1.5, -1.2) =  1.5   not clipped (the loss is never capped)
#   0.5, -2:  -min(-1.0, -1.6) =  1.6   clipped
#   0.5, +2:  -min(1.0, 1.6)   = -1.0   not clipped
#   3.0, +5:  padding, ignored
RATIOS = [1.1, 1.5, 1.5, 0.5, 0.5, 3.0]
ADVANTAGES = t([1.0, 1.0, -1.0, -2.0, 2.0, 5.0])
MASK = t([1, 1, 1, 1, 1, 0])


def _logprobs():
    return torch.tensor([[math.log(r) for r in RATIOS]], dtype=torch.float64, requires_grad=True)


def test_ppo_loss_inside_and_outside_the_clip_range():
    loss, stats = ppo_policy_loss(_logprobs(), torch.zeros(1, 6, dtype=torch.float64),
                                  ADVANTAGES, MASK, clip=0.2)
    close(loss, (-1.1 - 1.2 + 1.5 + 1.6 - 1.0) / 5)
    close(stats["clip_fraction"], 2 / 5)
    close(stats["dual_clip_fraction"], 0.0)
    close(stats["approx_kl"], sum(0.5 * math.log(r) ** 2 for r in RATIOS[:5]) / 5)


def test_clipped_and_padded_tokens_carry_no_gradient():
    logp = _logprobs()
    loss, _ = ppo_policy_loss(logp, torch.zeros(1, 6, dtype=torch.float64), ADVANTAGES, MASK, clip=0.2)
    loss.backward()
    # d(-r * A / 5) / d logp = -r * A / 5 where the unclipped branch is taken
    close(logp.grad, t([-1.1 / 5, 0, 1.5 / 5, 0, -1.0 / 5, 0]))


def test_ppo_loss_at_ratio_one_is_minus_the_mean_advantage():
    old = t([-1.0, -2.0, -0.5])
    loss, stats = ppo_policy_loss(old.clone(), old, t([1.0, -3.0, 5.0]), t([1, 1, 1]), 0.2)
    close(loss, -1.0)
    close(stats["clip_fraction"], 0.0)
    close(stats["approx_kl"], 0.0)


def test_dual_clip_caps_the_loss_of_a_runaway_ratio_with_a_negative_advantage():
    """ratio 5, A = -1: the clipped surrogate is -min(-5, -1.2) = 5; dual clip with c = 3 caps it
    at -c * A = 3 (and gives that token no gradient). A positive advantage is never dual-clipped:
    ratio 5, A = +1 gives -min(5, 1.2) = -1.2 either way."""
    logp = torch.tensor([[math.log(5.0), math.log(5.0), math.log(1.1)]], dtype=torch.float64,
                        requires_grad=True)
    old, adv, mask = torch.zeros(1, 3, dtype=torch.float64), t([-1.0, 1.0, -1.0]), t([1, 1, 1])
    plain, _ = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    close(plain, (5.0 - 1.2 + 1.1) / 3)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip=0.2, clip_ratio_c=3.0)
    close(loss, (3.0 - 1.2 + 1.1) / 3)
    close(stats["dual_clip_fraction"], 1 / 3)
    loss.backward()
    close(logp.grad, t([0.0, 0.0, 1.1 / 3]))  # d(-r * A / 3) / d logp = -r * A / 3 = 1.1 / 3


def test_a_log_ratio_beyond_20_is_clamped_before_exp():
    """logp - old = 200 would overflow exp to inf (and the loss to inf or nan); clamped at 20."""
    logp, old = torch.tensor([[200.0, 0.0]]), torch.zeros(1, 2)
    loss, stats = ppo_policy_loss(logp, old, torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2), clip=0.2)
    assert torch.isfinite(loss) and loss.item() == pytest.approx((math.exp(20) - 1.0) / 2, rel=1e-5)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * 20**2 / 2)
    capped, _ = ppo_policy_loss(logp, old, torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2), 0.2, 3.0)
    assert capped.item() == pytest.approx((3.0 - 1.0) / 2)


def test_importance_weights_per_token_times_the_loss():
    """Token losses by hand (ratio 1 everywhere: -A) times weights 0.5 and 2."""
    old = torch.zeros(1, 2, dtype=torch.float64)
    loss, _ = ppo_policy_loss(old.clone(), old, t([1.0, -1.0]), t([1, 1]), 0.2,
                              weights=t([0.5, 2.0]))
    close(loss, (-1.0 * 0.5 + 1.0 * 2.0) / 2)


def test_truncated_importance_weights_by_hand():
    """w = min(exp(trainer - rollout), cap) on real tokens: exp(0.1), exp(-0.3), exp(1.0) -> 2 (cap),
    and the padded column is 0; mean and max are of the raw ratios, clipped 1 of 3 tokens."""
    trainer, rollout = t([0.1, -0.3, 1.0, 9.0]), t([0.0, 0.0, 0.0, 0.0])
    weights, stats = truncated_is_weights(trainer, rollout, t([1, 1, 1, 0]), cap=2.0)
    close(weights, [math.exp(0.1), math.exp(-0.3), 2.0, 0.0])
    assert stats["tis_weight_mean"] == pytest.approx((math.exp(0.1) + math.exp(-0.3) + math.e) / 3)
    assert stats["tis_weight_max"] == pytest.approx(math.e)
    assert stats["tis_clipped_fraction"] == pytest.approx(1 / 3)
    assert not weights.requires_grad


def test_kl_as_a_loss_is_k2_or_clamped_k3_with_gradient():
    logp = torch.tensor([[0.0, -1.0, -30.0]], dtype=torch.float64, requires_grad=True)
    ref, mask = t([-0.5, 0.0, 0.0]), t([1, 1, 0])
    close(kl_loss(logp, ref, mask, "k2"), (0.125 + 0.5) / 2)
    # k3 per token: e^(ref - logp) - 1 - (ref - logp): e^-0.5 - 0.5, e^1 - 2
    k3 = kl_loss(logp, ref, mask, "k3")
    close(k3, (math.exp(-0.5) - 1 + 0.5 + math.e - 1 - 1) / 2)
    k3.backward()
    # d/dlogp of e^(ref - logp) - 1 - ref + logp = 1 - e^(ref - logp), halved by the mean
    close(logp.grad, t([(1 - math.exp(-0.5)) / 2, (1 - math.e) / 2, 0.0]))
    # a runaway token (e^30 - 31) is clamped at 10
    close(kl_loss(torch.tensor([[-30.0]]), torch.tensor([[0.0]]), torch.ones(1, 1), "k3"), 10.0)
    with pytest.raises(ValueError, match="k1"):
        kl_loss(logp, ref, mask, "k1")


def test_returns_to_go_sum_the_rest_of_each_response():
    close(returns_to_go(t([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]), t([0, 1, 1, 0], [1, 1, 1, 1])),
          [[0, 5, 3, 0], [26, 21, 15, 8]])


# --------------------------------------------------------------------------- value loss


def test_value_loss_takes_the_worse_of_clipped_and_unclipped():
    # clip 0.5, old values 0, so the clipped value lies in [-0.5, 0.5]:
    #   v 0.2, R 1: inside, both (0.2 - 1)^2 = 0.64
    #   v 2,   R 0: unclipped 4,  clipped (0.5 - 0)^2 = 0.25  -> 4    (unclipped branch)
    #   v 2,   R 3: unclipped 1,  clipped (0.5 - 3)^2 = 6.25  -> 6.25 (clipped branch)
    #   v 10,  R -10: padding
    values, returns = t([0.2, 2.0, 2.0, 10.0]), t([1.0, 0.0, 3.0, -10.0])
    loss = value_loss(values, torch.zeros(1, 4, dtype=torch.float64), returns, t([1, 1, 1, 0]), clip=0.5)
    close(loss, 0.5 * (0.64 + 4 + 6.25) / 3)


# --------------------------------------------------------------------------- entropy


def test_entropy_from_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -math.inf, -math.inf],
                           [50.0, 0.0, 0.0, 0.0]])
    # uniform over 4: log 4; probabilities 1/4, 3/4: -(1/4 log 1/4 + 3/4 log 3/4); near one-hot: ~0
    expected = [math.log(4), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), 0.0]
    assert entropy_from_logits(logits).tolist() == pytest.approx(expected, abs=1e-5)
    assert entropy_from_logits(logits[:2] + 7.0).tolist() == pytest.approx(expected[:2], abs=1e-5)


def test_entropy_of_masked_logits_has_a_finite_gradient():
    logits = torch.tensor([[0.0, 1.0, -math.inf]], requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 2] == 0


# --------------------------------------------------------------------------- KL controller


def test_adaptive_kl_moves_up_when_kl_is_above_target_and_down_when_below():
    # error = clip(kl / 6 - 1, -0.2, 0.2); value *= 1 + error * 256 / 10000
    assert KLController(0.1, target=6.0).update(6.6, 256) == pytest.approx(0.1 * (1 + 0.1 * 0.0256))
    assert KLController(0.1, target=6.0).update(5.4, 256) == pytest.approx(0.1 * (1 - 0.1 * 0.0256))


def test_adaptive_kl_error_is_clipped_at_20_percent():
    assert KLController(0.1, target=6.0).update(60.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 0.0256))
    assert KLController(0.1, target=6.0).update(0.0, 256) == pytest.approx(0.1 * (1 - 0.2 * 0.0256))


def test_adaptive_kl_keeps_its_state_and_does_not_move_on_target():
    kl = KLController(0.1, target=6.0, horizon=100)
    kl.update(12.0, 50)  # 0.1 * 1.1
    kl.update(12.0, 50)  # 0.11 * 1.1
    assert kl.value == pytest.approx(0.121)
    assert kl.update(6.0, 50) == pytest.approx(0.121)


def test_fixed_kl_does_not_move():
    kl = KLController(0.05)
    assert kl.update(100.0, 256) == 0.05 and kl.update(0.0, 256) == 0.05 and kl.value == 0.05
