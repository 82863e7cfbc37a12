"""The math of PPO-style RLHF, as plain functions over tensors.

Conventions: a batch of responses is a (B, T) tensor with a `mask` that is 1 on real response
tokens and 0 elsewhere (padding, or the prompt before the response); a sequence's reward (B,)
belongs to its last real token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


# --------------------------------------------------------------------------- masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over everything or along `dim`; 0 where the mask is empty."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1e-8)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1e-8)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (population variance); padding is 0.

    With shift_mean=False the mean is added back: only the scale changes.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# --------------------------------------------------------------------------- KL and rewards


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
               estimator: Literal["k1", "k2", "k3"] = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from tokens sampled by the policy (Schulman 2020).

    k1 = logp - logp_ref (unbiased, can be negative per token);
    k2 = (logp - logp_ref)^2 / 2 (biased, low variance; as a loss its gradient is KL's);
    k3 = (r - 1) - log r with r = exp(logp_ref - logp) (unbiased, always >= 0).
    As a reward (a detached per-token penalty) only k1 and k2 push toward the reference: k3's
    expected gradient there is grad KL(pi||ref) - grad KL(ref||pi), nearly nothing near the
    reference. k3 belongs in a loss (`kl_loss`).
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if estimator == "k3":
        log_r = ref_logprobs - logprobs
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r} (expected 'k1', 'k2' or 'k3')")


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
            estimator: Literal["k2", "k3"] = "k3") -> torch.Tensor:
    """KL(policy || ref) as a loss term with gradient (verl's use_kl_loss): the masked mean of k2,
    or of k3 clamped to [-10, 10] (one token whose ratio explodes cannot swamp the batch)."""
    if estimator not in ("k2", "k3"):
        raise ValueError(f"KL as a loss takes 'k2' or 'k3', not {estimator!r} (k1's gradient "
                         "is zero in expectation)")
    kl = kl_penalty(logprobs, ref_logprobs, estimator)
    return masked_mean(kl.clamp(-10, 10) if estimator == "k3" else kl, mask)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_{s >= t} r_s along each row over the masked entries (gamma = 1); 0 off the mask."""
    rewards = rewards * mask.to(rewards.dtype)
    return (rewards.flip(1).cumsum(1).flip(1)) * mask.to(rewards.dtype)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float,
                  mask: torch.Tensor) -> torch.Tensor:
    """r_t = -kl_coef * kl_t on every real token, plus the sequence score on the last real token."""
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    # The last masked column of each row (the response may start after a prompt).
    columns = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, columns, -1).max(1).values
    bonus = torch.where(last >= 0, scores.to(kl.dtype), torch.zeros_like(rewards[:, 0]))
    return rewards.scatter_add(1, last.clamp(min=0)[:, None], bonus[:, None])


def clip_rewards(scores: torch.Tensor, limit: float) -> torch.Tensor:
    """Scores clamped to [-limit, limit]."""
    return scores.clamp(-limit, limit)


def unfinished_penalty(scores: torch.Tensor, finished: torch.Tensor, penalty: float) -> torch.Tensor:
    """scores + penalty for responses that did not finish (cut off at the length limit)."""
    return torch.where(finished, scores, scores + penalty)


# --------------------------------------------------------------------------- advantages


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2015), backwards over each response.

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},
    with V and A taken as 0 after the last real token; returns R_t = A_t + V_t.
    Padded positions get A = R = 0. Pass detached tensors: this is a target, not a loss.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask  # padding then contributes nothing
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_adv
    return advantages, advantages + values


def group_advantages(scores: torch.Tensor, group_size: int,
                     method: Literal["grpo", "rloo"] = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """Critic-free advantages (B,) from groups of samples of the same prompt, laid out group after group.

    grpo: (s - mean_group) / (std_group + eps), std with Bessel's correction (Shao et al. 2024);
    rloo: s - mean of the other group_size - 1 samples (leave-one-out; Ahmadian et al. 2024),
    which equals group_size / (group_size - 1) * (s - mean_group).
    """
    if group_size < 2:
        raise ValueError(f"a group baseline needs group_size >= 2, got {group_size}")
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    groups = scores.view(-1, group_size)
    mean = groups.mean(1, keepdim=True)
    if method == "grpo":
        adv = (groups - mean) / (groups.std(1, keepdim=True) + eps)
    elif method == "rloo":
        adv = groups - (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    else:
        raise ValueError(f"unknown group method {method!r} (expected 'grpo' or 'rloo')")
    return adv.view(-1)


# --------------------------------------------------------------------------- losses


LOG_RATIO_LIMIT = 20.0  # exp(20) ~ 5e8: a ratio past it is a broken token, not a signal


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float, clip_ratio_c: float | None = None,
                    weights: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017) and its detached diagnostics.

    ratio = exp(clamp(logp - logp_old, -20, 20)); per token -min(ratio * A, clip(ratio, 1-c, 1+c) * A).
    Dual clip (Ye et al. 2020): where A < 0 the loss is also capped at -clip_ratio_c * A, so a
    token whose ratio has run far away cannot dominate. `weights` (e.g. truncated importance
    weights) multiply each token's loss. Diagnostics: clip_fraction (the clipped branch is the
    smaller one: no gradient), dual_clip_fraction, and approx_kl = masked mean of
    0.5 * (logp - logp_old)^2, the second-order estimate of KL(old || new).
    """
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    losses = -torch.min(unclipped, clipped)
    dual = torch.zeros_like(losses, dtype=torch.bool)
    if clip_ratio_c is not None:
        cap = -clip_ratio_c * advantages
        dual = (advantages < 0) & (losses > cap)
        losses = torch.where(dual, cap, losses)
    if weights is not None:
        losses = losses * weights
    stats = {"clip_fraction": masked_mean((clipped < unclipped).to(ratio.dtype), mask),
             "dual_clip_fraction": masked_mean(dual.to(ratio.dtype), mask),
             "approx_kl": masked_mean(0.5 * log_ratio**2, mask)}
    return masked_mean(losses, mask), {k: v.detach() for k, v in stats.items()}


def truncated_is_weights(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                         mask: torch.Tensor, cap: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance sampling (Yao et al. 2025; verl's rollout correction): per token
    min(pi_train / pi_rollout, cap), correcting for the rollout engine sampling from numerically
    different logits than the trainer scores (bf16 vLLM vs the trainer). 0 off the mask; detached.
    Also their mean and max over real tokens and the fraction truncated at the cap."""
    log_w = (trainer_logprobs - rollout_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    raw = torch.exp(log_w.detach())
    weights = raw.clamp(max=cap) * mask.to(raw.dtype)
    real = mask.bool()
    stats = {"tis_weight_mean": masked_mean(raw, mask).item(),
             "tis_weight_max": raw[real].max().item() if real.any() else 0.0,
             "tis_clipped_fraction": masked_mean((raw > cap).to(raw.dtype), mask).item()}
    return weights, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float) -> torch.Tensor:
    """Clipped value loss: masked mean of 0.5 * max((v - R)^2, (clip(v, old - c, old + c) - R)^2).

    Taking the max keeps the pessimistic branch, so a value cannot earn a lower loss by leaving
    the trust region around the value that was used for the advantages.
    """
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    worst = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(worst, mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last axis: -sum(p * log p), with 0 log 0 = 0."""
    logp = torch.log_softmax(logits.float(), -1)
    # masked (-inf) logits have p = 0; a finite floor keeps 0 * log 0 (and its gradient) from being nan
    logp = logp.clamp(min=torch.finfo(logp.dtype).min)
    return -(logp.exp() * logp).sum(-1)


# --------------------------------------------------------------------------- KL coefficient


@dataclass
class KLController:
    """The KL penalty's coefficient; fixed when target is None, else adaptive (Ziegler et al. 2019).

    Adaptive: error = clip(kl / target - 1, -0.2, 0.2); value *= 1 + error * n_steps / horizon,
    so the coefficient grows while the policy drifts further than target from the reference.
    """

    value: float
    target: float | None = None
    horizon: int = 10_000

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient after n_steps samples whose mean KL was current_kl; return it."""
        if self.target is not None:
            error = min(max(current_kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon
        return self.value
