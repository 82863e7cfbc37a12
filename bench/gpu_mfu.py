"""Model FLOPs utilisation (MFU) of the pretraining loop alone on one GPU, for a ~110M-parameter model.

Runs `train(PretrainTask, Worker(device=cuda))` (bf16 autocast, as the loop does on CUDA) on random
token shards written with numpy in the format of rlhf_ray/data/shards.py, with a 32768-id BPE trained
on generated words (vocab_size is the only thing of the tokenizer that matters here). The model is
hidden 768, 12 layers, 12 heads, SwiGLU 2048, seq 1024, tied embeddings. Prints each step's tokens/s
and MFU as the loop reports them (`mfu` is against the datasheet bf16 peak of rlhf_ray/train/flops.py;
on a CPU, against a measured fp32 matmul rate), then the medians after the warm-up steps. Target: MFU
>= 40% on an H100-class GPU.

The loop synchronises the GPU before it times a step, so its tokens/s and MFU are the GPU's.

No ray and no vllm are needed: they are blocked below, so a run anywhere proves it. Needs (pip):
    torch numpy transformers tokenizers safetensors tiktoken rustbpe pydantic pyyaml
(at the versions pinned in pyproject.toml).

    python bench/gpu_mfu.py            # on a GPU
    python bench/gpu_mfu.py --small    # a 4.5M model in seconds on a CPU (the default without CUDA)
"""

from __future__ import annotations

import sys

# The training loop alone needs neither: an import of either would fail here.
sys.modules["ray"] = None  # type: ignore[assignment]
sys.modules["vllm"] = None  # type: ignore[assignment]

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rlhf_ray.config import GPT4_SPLIT_PATTERN, validate_config  # noqa: E402
from rlhf_ray.data.shards import META, token_dtype  # noqa: E402
from rlhf_ray.tokenizer import train_bpe  # noqa: E402
from rlhf_ray.train.loop import Worker, train  # noqa: E402
from rlhf_ray.train.tasks import PretrainTask  # noqa: E402

FULL = dict(hidden=768, layers=12, heads=12, ffn=2048, seq=1024, vocab=32768, batch=64, micro=16, steps=30, warmup=5)
SMALL = dict(hidden=256, layers=4, heads=4, ffn=768, seq=256, vocab=4096, batch=8, micro=4, steps=10, warmup=3)


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lexicon = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(50_000)]
    words = rng.choice(lexicon, size=400_000)
    texts = [" ".join(words[i : i + 200]) for i in range(0, len(words), 200)]
    train_bpe(texts, vocab_size, GPT4_SPLIT_PATTERN, max_chars=10**9).save(folder)


def write_random_shards(folder: Path, vocab_size: int, tokens: dict[str, int]) -> None:
    """meta.json + one shard per split, as rlhf_ray.data.shards.write_shards lays them out."""
    folder.mkdir(parents=True)
    dtype = token_dtype(vocab_size)
    rng = np.random.default_rng(0)
    splits = {}
    for split, count in tokens.items():
        rng.integers(0, vocab_size, count, dtype=dtype).tofile(folder / f"{split}_00000.bin")
        splits[split] = {"files": [f"{split}_00000.bin"], "tokens": count}
    meta = {"vocab_size": vocab_size, "dtype": dtype.name, "sources": [], "val_every": 10,
            "documents": 0, "splits": splits}
    (folder / META).write_text(json.dumps(meta, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", default=not torch.cuda.is_available(),
                        help="a 4M model for a CPU (the default without CUDA)")
    for name in FULL:
        parser.add_argument(f"--{name}", type=int, help=f"default {FULL[name]} ({SMALL[name]} with --small)")
    args = parser.parse_args()
    p = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in (SMALL if args.small else FULL).items()}
    if p["steps"] < p["warmup"] + 2:
        parser.error("--steps must be at least --warmup + 2 (the last step is not timed)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_tokenizer(tmp / "tokenizer", p["vocab"])
        write_random_shards(tmp / "tokens", p["vocab"], {"train": 1 << 22, "val": 1 << 17})
        never = p["steps"] * 10  # no mid-run eval or checkpoint; the loop does both after the last step
        cfg = validate_config({
            "runs_dir": str(tmp), "data": {"demo": None}, "tokenizer": {"vocab_size": p["vocab"]},
            "model": {"hidden_size": p["hidden"], "num_layers": p["layers"], "num_heads": p["heads"],
                      "num_kv_heads": p["heads"], "intermediate_size": p["ffn"], "max_seq_len": p["seq"]},
            "pretrain": {"steps": p["steps"], "batch_size": p["batch"], "micro_batch_size": p["micro"],
                         "seq_len": p["seq"], "eval_every": never, "checkpoint_every": never}})
        task = PretrainTask(cfg, tmp / "tokens", tmp / "tokenizer", out_dir=tmp / "base",
                             eval_windows=p["micro"])
        params = sum(t.numel() for t in task.build_model().parameters())
        train(task, Worker(device=device, metrics_path=tmp / "metrics.jsonl"))
        steps = [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines()]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\ndevice: {name}; torch {torch.__version__}; "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32 (CPU: MFU vs a measured matmul rate)'}")
    print(f"model {params / 1e6:.1f}M parameters (hidden {p['hidden']}, {p['layers']} layers, {p['heads']} heads, "
          f"vocab {p['vocab']}); batch {p['batch']} x {p['seq']} tokens, micro-batch {p['micro']}")
    print(f"{'step':>4} {'step s':>7} {'tokens/s':>9} {'MFU':>6}")
    for m in steps:
        print(f"{m['step']:4d} {m['step_s']:7.3f} {m['tokens_per_s']:9.0f} {m['mfu']:6.1%}")
    steady = steps[p["warmup"] : -1]  # the last step also evaluates and checkpoints
    tokens = statistics.median(m["tokens_per_s"] for m in steady)
    mfu = statistics.median(m["mfu"] for m in steady)
    verdict = ("met" if mfu >= 0.4 else "NOT met") if device.type == "cuda" else "n/a (not a GPU run)"
    print(f"median of steps {p['warmup'] + 1}-{len(steps) - 1}: tokens/s {tokens:.0f}, MFU {mfu:.1%}; "
          f"target MFU >= 40% on an H100-class GPU: {verdict}")


if __name__ == "__main__":
    main()
