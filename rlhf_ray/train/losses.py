"""The training objectives, as plain functions over tensors."""

from __future__ import annotations

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
