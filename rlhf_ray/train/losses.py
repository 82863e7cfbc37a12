"""The training objectives, as plain functions over tensors."""

from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F

IGNORE = -100  # label of positions that carry no loss (prompt tokens, padding)


def shifted_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Labels for next-token prediction: position t predicts ids[t+1] where mask[t+1] is 1."""
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], IGNORE)
    return labels


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over labelled positions, and how many there were.

    Returning the sum lets gradient accumulation divide by the token count of the whole batch,
    so every target token weighs the same however the batch is split.
    """
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                           reduction="sum")
    return loss, (labels != IGNORE).sum()


def bradley_terry_loss(better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_better - r_worse) per pair: the reward model's preference likelihood."""
    return -F.logsigmoid(better - worse)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sequence, the summed log-probability of its labelled tokens (B,): log pi(response | prompt)."""
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                                reduction="none")
    return -per_token.view(labels.shape).sum(-1)


def ranking_pairs(size: int) -> tuple[list[int], list[int]]:
    """Every (better, worse) pair of a ranking listed best first: (0, 1), (0, 2), ..., (1, 2), ..."""
    pairs = list(combinations(range(size), 2))
    return [i for i, _ in pairs], [j for _, j in pairs]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, variant: str = "sigmoid") -> torch.Tensor:
    """DPO's loss per pair, from sequence log-probabilities under the policy and the reference.

    h = log pi(y_w)/ref(y_w) - log pi(y_l)/ref(y_l), how much more the policy prefers the chosen
    response than the reference does. "sigmoid" (DPO, Rafailov et al. 2023): -log sigmoid(beta h),
    the Bradley-Terry likelihood of the implicit reward beta * log pi/ref. "ipo" (Azar et al. 2023):
    (h - 1/(2 beta))^2, which pulls h to a finite target instead of pushing it without end.
    """
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if variant == "sigmoid":
        return -F.logsigmoid(beta * h)
    if variant == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {variant!r}: use 'sigmoid' or 'ipo'")


def ranking_dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float, variant: str = "sigmoid"
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO on one comparison: its responses' log-probabilities (K,) under policy and reference,
    best first. The loss is the mean over all K(K-1)/2 pairs, so a comparison weighs one however
    many responses it ranks; with it (detached) the pairs' mean implicit rewards
    beta * log pi/ref of the better and the worse response, their margin, and the fraction of
    pairs the implicit reward orders as the labeler did."""
    better, worse = ranking_pairs(len(policy))
    loss = dpo_loss(policy[better], policy[worse], reference[better], reference[worse], beta, variant)
    rewards = beta * (policy - reference).detach()
    chosen, rejected = rewards[better], rewards[worse]
    return loss.mean(), {"chosen_reward": chosen.mean(), "rejected_reward": rejected.mean(),
                         "margin": (chosen - rejected).mean(), "accuracy": (chosen > rejected).float().mean()}
