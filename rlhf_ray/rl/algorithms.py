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
               estimator: Literal["k1", "k3"] = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from tokens sampled by the policy.

    k1 = logp - logp_ref (unbiased, can be negative per token);
    k3 = (r - 1) - log r with r = exp(logp_ref - logp) (unbiased, always >= 0; Schulman 2020).
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_r = ref_logprobs - logprobs
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r} (expected 'k1' or 'k3')")


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


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017), and two diagnostics.

    ratio = exp(logp - logp_old); loss = masked mean of -min(ratio * A, clip(ratio, 1-c, 1+c) * A).
    clip_fraction: share of real tokens where the clipped branch is the smaller one (no gradient).
    approx_kl: masked mean of 0.5 * (logp - logp_old)^2, the second-order estimate of
    KL(old || new); both diagnostics are detached.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    loss = masked_mean(-torch.min(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped < unclipped).to(ratio.dtype), mask).detach()
    approx_kl = masked_mean(0.5 * log_ratio**2, mask).detach()
    return loss, clip_fraction, approx_kl


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
