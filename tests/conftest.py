"""Shared fixtures: a tiny trained tokenizer and model, saved as Hugging Face folders."""

from pathlib import Path

import pytest
import torch

from rlhf_ray.config import GPT4_SPLIT_PATTERN
from rlhf_ray.modeling import load_scalar_model, new_policy, save_model
from rlhf_ray.tokenizer import BPETokenizer, train_bpe
from tests.tiny import FACTS, TINY_MODEL, memorise

# Tiny models gain nothing from threads, and on a 2-core CI machine the suite's Ray workers and
# vLLM engines need the other core.
torch.set_num_threads(1)

@pytest.fixture(scope="session")
def tiny_tokenizer() -> BPETokenizer:
    return train_bpe([FACTS] * 100, vocab_size=320, pattern=GPT4_SPLIT_PATTERN, max_chars=10**9)


@pytest.fixture(scope="session")
def tiny_policy_dir(tiny_tokenizer: BPETokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A policy that has memorised FACTS, so its greedy continuation is far from any tie."""
    model = new_policy(TINY_MODEL, tiny_tokenizer, seed=0)
    memorise(model, torch.tensor([tiny_tokenizer.encode_document(FACTS)]), steps=80)
    folder = tmp_path_factory.mktemp("models") / "policy"
    save_model(model, tiny_tokenizer, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_reward_dir(tiny_policy_dir: Path, tiny_tokenizer: BPETokenizer) -> Path:
    """The policy's backbone with a freshly initialised scalar head, as reward training starts."""
    torch.manual_seed(0)
    model = load_scalar_model(tiny_policy_dir)
    folder = tiny_policy_dir.parent / "reward"
    save_model(model, tiny_tokenizer, folder)
    return folder
