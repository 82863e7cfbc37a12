"""Model FLOPs per token and the device's peak, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import time

import torch
from transformers import PretrainedConfig

# Dense bf16 peak FLOP/s of common training GPUs (vendor figures, without sparsity).
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                 "A10G": 70e12, "A10": 125e12}


def flops_per_token(config: PretrainedConfig, seq_len: int, num_params: int) -> float:
    """Forward + backward FLOPs per trained token: 6 per weight, plus attention over the context."""
    layers, width = config.num_hidden_layers, config.hidden_size
    embedding = config.vocab_size * width
    weights = num_params - (0 if config.tie_word_embeddings else embedding)  # lookups cost nothing
    attention = 12 * layers * width * seq_len
    return 6 * weights + attention


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The GPU's datasheet peak, or on a CPU one thread's measured matmul rate times the threads
    torch uses. Measured with all threads at once, one core busy elsewhere (a Ray process
    starting up) slows every thread to its pace, and MFU came out above 1."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak if dtype == torch.bfloat16 else peak / 2
    if device.type != "cpu":
        return measured_matmul_flops(device, dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measured_matmul_flops(device, dtype) * threads
    finally:
        torch.set_num_threads(threads)


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 6) -> float:
    """The best of several large matmuls: a peak other processes starting up cannot pull down much."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
