"""The tiny model and text the shared fixtures train on."""

import torch

from rlhf_ray.config import ModelConfig

TINY_MODEL = ModelConfig(
    hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, max_seq_len=512
)
FACTS = (
    "The capital of France is Paris. The capital of Japan (日本) is Tokyo. "
    "The capital of Peru is Lima. The capital of Kenya is Nairobi. Ça va? 🙂"
)


def memorise(model: torch.nn.Module, ids: torch.Tensor, steps: int, lr: float = 3e-3) -> None:
    """Train `model` on one token sequence until it has it by heart (sharp, tie-free logits)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def shorter_first(prompt: list[dict[str, str]], responses: list[str], ground_truth: str | None) -> list[float]:
    """A labeler function for tests: the shorter response is the better one."""
    return [-float(len(r)) for r in responses]
