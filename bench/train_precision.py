"""Training step time of the demo model in float32 vs bf16 autocast, interleaved in one run.

This is what `precision: auto` decides on: bf16 on GPUs, and on CPUs with native bf16 (AVX512-BF16 or
AMX). One step = forward + backward of 2 micro-batches of 16 × 256 tokens + AdamW; rounds alternate
the two precisions so that load on the machine hits both alike; the table shows the best step of
each.

    .venv/bin/python bench/train_precision.py [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rlhf_ray.config import GPT4_SPLIT_PATTERN, load_config
from rlhf_ray.modeling import count_parameters, new_policy
from rlhf_ray.tokenizer import train_bpe
from rlhf_ray.train.losses import lm_loss
from rlhf_ray.train.optim import make_optimizer

CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(CONFIG)
    # Random ids stand in for text; only the vocabulary's size matters for the timing.
    words = [f"w{i} x{i * 7 % 101} y{i * 13 % 97}" for i in range(20_000)]
    tokenizer = train_bpe(words, cfg.tokenizer.vocab_size, GPT4_SPLIT_PATTERN, max_chars=10**9)
    model = new_policy(cfg.model, tokenizer)
    optimizer = make_optimizer(model, cfg.pretrain.optim)
    batch = torch.randint(0, tokenizer.vocab_size, (16, cfg.pretrain.seq_len + 1))

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        for _ in range(2):
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss, count = lm_loss(model(input_ids=batch[:, :-1]).logits, batch[:, 1:])
            (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    best = {False: float("inf"), True: float("inf")}
    for _ in range(args.rounds):
        for bf16 in (False, True):
            best[bf16] = min(best[bf16], *(step(bf16) for _ in range(3)))
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {native}; "
          f"{args.threads} threads; model {count_parameters(model) / 1e6:.1f}M parameters")
    print(f"{'precision':<16} {'s/step':>7} {'vs float32':>11}")
    for bf16, name in ((False, "float32"), (True, "bf16 autocast")):
        print(f"{name:<16} {best[bf16]:7.3f} {best[False] / best[bf16]:10.2f}x")


if __name__ == "__main__":
    main()
