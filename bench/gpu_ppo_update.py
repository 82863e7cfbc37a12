"""Tokens/s and MFU of the PPO policy update on one GPU: a random-init ~0.5B Llama in bf16.

Runs `PolicyRole.update` (rlhf_ray/rl/roles.py) on a batch of random token sequences, as the PPO
controller would after a rollout: first the role alone (bf16 autocast over float32 weights, the
path of one unsharded worker), then the same role as FSDP2 over a process group of world size 1
(NCCL on a GPU, gloo on a CPU): the sharded path, with bf16 gathered parameters and float32
reduction, minus the communication that more GPUs would add. MFU counts 6 FLOPs per weight per
token plus attention (rlhf_ray/train/flops.py) against the GPU's datasheet bf16 peak (on a CPU,
a measured matmul rate); the policy pass that PPO runs before the update is not counted.

Neither ray nor vllm is needed: they are blocked below, so a run on a GPU box without them
proves it. The model is hidden 1280, 24 layers, 20 heads, SwiGLU 3456, a 32768-id vocabulary
(517M parameters); 64 sequences of 1024 tokens (512 prompt + 512 response) in mini-batches of 16.

    python bench/gpu_ppo_update.py            # on a GPU
    python bench/gpu_ppo_update.py --small    # a small model in seconds on a CPU (the default without CUDA)
"""

from __future__ import annotations

import sys

sys.modules["ray"] = None  # type: ignore[assignment]
sys.modules["vllm"] = None  # type: ignore[assignment]

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_mfu import write_tokenizer  # noqa: E402

from rlhf_ray.config import ModelConfig, PPOConfig  # noqa: E402
from rlhf_ray.modeling import count_parameters, new_policy, save_model  # noqa: E402
from rlhf_ray.rl.roles import Experience, PolicyRole  # noqa: E402
from rlhf_ray.tokenizer import load_tokenizer  # noqa: E402
from rlhf_ray.train.flops import flops_per_token, peak_flops  # noqa: E402

FULL = dict(hidden=1280, layers=24, heads=20, ffn=3456, vocab=32768, prompt=512, response=512,
            batch=64, mini_batch=16, repeats=5)
SMALL = dict(hidden=128, layers=2, heads=2, ffn=384, vocab=2048, prompt=32, response=32,
             batch=8, mini_batch=4, repeats=3)


def random_experience(batch: int, prompt: int, response: int, vocab: int) -> Experience:
    g = torch.Generator().manual_seed(0)
    length = prompt + response
    sequences = torch.randint(3, vocab, (batch, length), generator=g)
    response_mask = torch.zeros(batch, length - 1, dtype=torch.long)
    response_mask[:, prompt - 1 :] = 1
    exp = Experience(sequences, torch.ones_like(sequences), response_mask,
                     torch.ones(batch, dtype=torch.bool), torch.zeros(batch, length - 1))
    exp.advantages = torch.randn(batch, length - 1, generator=g) * response_mask
    exp.ref_logprobs = torch.full((batch, length - 1), -8.0) * response_mask
    return exp


def time_updates(role: PolicyRole, exp: Experience, ppo: PPOConfig, repeats: int) -> float:
    """Median seconds of one update (after one warm-up), the GPU's work included."""
    exp.old_logprobs = role.logprobs(exp)
    seconds = []
    for i in range(repeats + 1):
        if role.device.type == "cuda":
            torch.cuda.synchronize(role.device)
        start = time.perf_counter()
        role.update(exp, ppo, kl_coef=0.01, seed=i)
        if role.device.type == "cuda":
            torch.cuda.synchronize(role.device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", default=not torch.cuda.is_available())
    args = parser.parse_args()
    p = SMALL if args.small else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_tokenizer(folder / "tokenizer", p["vocab"])
        tokenizer = load_tokenizer(folder / "tokenizer")
        cfg = ModelConfig(hidden_size=p["hidden"], num_layers=p["layers"], num_heads=p["heads"],
                          num_kv_heads=p["heads"], intermediate_size=p["ffn"],
                          max_seq_len=p["prompt"] + p["response"])
        save_model(new_policy(cfg, tokenizer), tokenizer, folder / "policy")
        exp = random_experience(p["batch"], p["prompt"], p["response"], tokenizer.vocab_size)
        ppo = PPOConfig(mini_batch_size=p["mini_batch"], kl_mode="loss", kl_estimator="k3")
        tokens = int(exp.attention_mask.sum())
        rows = []
        for strategy in ("ddp", "fsdp"):  # alone (no group), then FSDP2 over a group of one
            if strategy == "fsdp":
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0,
                                        world_size=1, store=dist.HashStore())
            role = PolicyRole(folder / "policy", lr=1e-6, device=device, precision="bfloat16",
                              strategy=strategy)  # shards itself once a group exists
            params = count_parameters(role.model)
            flops = flops_per_token(role.model.config, exp.sequences.shape[1], params) * tokens
            seconds = time_updates(role, exp, ppo, p["repeats"])
            peak = peak_flops(device, torch.bfloat16)
            memory = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
            rows.append((strategy if strategy == "fsdp" else "alone", params, seconds, tokens / seconds,
                         flops / seconds / peak, memory))
            del role
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"PPO policy update, {name}, bf16, {p['batch']} x {exp.sequences.shape[1]} tokens, "
              f"mini-batches of {p['mini_batch']}")
        print("| path | params | s/update | tokens/s | MFU | peak GPU memory GB |")
        print("|---|---:|---:|---:|---:|---:|")
        for path, params, seconds, rate, mfu, memory in rows:
            print(f"| {path} | {params / 1e6:.0f}M | {seconds:.3f} | {rate:,.0f} | {mfu:.1%} | {memory:.1f} |")


if __name__ == "__main__":
    main()
