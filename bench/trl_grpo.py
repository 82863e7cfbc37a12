"""Seconds per GRPO step of TRL's GRPOTrainer on a CPU: the TRL half of the GRPO step-time comparison.

One step = sample len(prompts) × group_size completions with transformers' `generate` (not vLLM:
TRL's vLLM colocate mode fails on the CPU build), score them, reference-model log-probs (beta > 0,
as our KL penalty), one forward + backward over all completions, one AdamW step. Every completion
runs the full max_new_tokens (`min_new_tokens` suppresses the stop ids). bf16 autocast with float32
weights where the CPU has native bf16 (as our `precision: auto`), else float32. No gradient
checkpointing (our loop uses none). Model loading and one warm-up step are not timed.

    pip install -e '.[cpu,bench]'
    .venv/bin/python bench/trl_grpo.py   # self-test: 4M-parameter Llama, 8 prompts × 8 × 128 tokens
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer


def length_reward(completions: list[str]) -> list[float]:
    """Default reward: characters / 100. Cheap, so the timing is TRL's own work."""
    return [len(c) / 100 for c in completions]


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step: generation, rewards, ref log-probs, backward and AdamW."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)


def trl_grpo_step_seconds(
    model_dir: Path,
    prompts: list[str],
    group_size: int,
    max_new_tokens: int,
    steps: int,
    reward_fn: Callable[[list[str]], list[float]] | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    reward_fn = reward_fn or length_reward
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    tokens: list[int] = []  # completion tokens of each step (TRL calls the reward once per generation)

    def reward(completions: list[list[dict[str, str]]], completion_ids: list[list[int]], **_) -> list[float]:
        tokens.append(sum(len(ids) for ids in completion_ids))
        return reward_fn([c[-1]["content"] for c in completions])

    batch = len(prompts) * group_size
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_grpo_"),
        per_device_train_batch_size=batch,  # one optimizer step = one generation batch, no accumulation
        generation_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=group_size,
        max_completion_length=max_new_tokens,
        generation_kwargs={"min_new_tokens": max_new_tokens},  # no early stop: all run max_new_tokens
        temperature=1.0,
        beta=0.02,  # > 0, so a reference model is loaded and run, as our kl_coef 0.02
        learning_rate=1e-6,
        use_vllm=False,
        bf16=bf16,  # accelerate's bf16 autocast; weights stay float32
        gradient_checkpointing=False,  # TRL defaults to True; our loop does not checkpoint
        max_steps=1 + steps,  # + 1 warm-up step
        shuffle_dataset=False,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        push_to_hub=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=True,
        seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))  # has <|pad|> and a chat_template
    # Conversational prompts: TRL applies the model's chat template (add_generation_prompt=True).
    # `prompts` repeated so the dataset never runs out; each step takes len(prompts) of them in order.
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts] * (1 + steps)})
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return {
        "seconds_per_step": statistics.mean(timer.seconds[1:]),
        "step_seconds": timer.seconds[1:],  # each timed step, for a median
        "completions_per_step": batch,
        "completion_tokens_per_step": statistics.mean(tokens[1:]),
        "dtype": "bf16 autocast" if args.bf16 else "float32",
    }


if __name__ == "__main__":
    from rlhf_ray.config import GPT4_SPLIT_PATTERN, ModelConfig
    from rlhf_ray.modeling import count_parameters, new_policy, save_model
    from rlhf_ray.tokenizer import train_bpe

    text = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 20
    tokenizer = train_bpe([text] * 50, vocab_size=512, pattern=GPT4_SPLIT_PATTERN, max_chars=10**9)
    model = new_policy(ModelConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                                   intermediate_size=768, max_seq_len=512), tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tokenizer, Path(tmp) / "policy")
        prompts = [f"Tell me about fox number {i}." for i in range(8)]
        result = trl_grpo_step_seconds(Path(tmp) / "policy", prompts, group_size=8, max_new_tokens=128, steps=2)
    print(f"model {count_parameters(model) / 1e6:.1f}M parameters; {result}")
