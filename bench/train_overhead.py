"""Pretraining throughput on Ray Train vs the same loop run alone: what does Ray Train cost?

One run folder (demo data -> tokenizer -> token shards, configs/demo.yaml with runs_dir in a temp
dir) feeds two runs of the same `PretrainTask` (the demo's ~4M-parameter model, same batch, same
steps): `train(task, Worker())` in this process with torch threads = pretrain.resources.
cpus_per_worker, then `run_on_ray_train` with one worker of that many CPUs. Each run's worker
records the torch threads it actually got. Tokens/s is the median of the per-step `tokens_per_s`
in the metrics jsonl, warm-up steps left out; a step's time covers batch, forward, backward and
optimizer, not the evaluation and checkpoint of the last step. Wall time is the whole call: model
build, Ray Train's startup and teardown, the final eval, checkpoint and export. Target: Ray Train
costs under 10% of the alone throughput.

    .venv/bin/python bench/train_overhead.py [--steps 30] [--warmup 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rlhf_ray.cluster import connect
from rlhf_ray.config import load_config
from rlhf_ray.pipeline import make_demo_data, make_shards, make_tokenizer, prepare_run
from rlhf_ray.train.loop import Worker, train
from rlhf_ray.train.ray_stage import run_on_ray_train
from rlhf_ray.train.stages import pretrain_task
from rlhf_ray.train.tasks import PretrainTask

REPO = Path(__file__).resolve().parent.parent


class ThreadsRecorded(PretrainTask):
    """PretrainTask that writes the torch threads of the process building its model next to out_dir."""

    def build_model(self) -> torch.nn.Module:
        self.out_dir.with_suffix(".threads").write_text(str(torch.get_num_threads()))
        return super().build_model()


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def steady_tokens_per_s(metrics_path: Path, warmup: int) -> tuple[float, float, int]:
    """Median tokens/s of the steps after `warmup`, its spread (p90 - p10) / median, the step count."""
    rates = [m["tokens_per_s"] for m in map(json.loads, metrics_path.read_text().splitlines())
             if m["step"] > warmup]
    p10, *_, p90 = statistics.quantiles(rates, n=10)
    return statistics.median(rates), (p90 - p10) / statistics.median(rates), len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the median")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        never = args.steps * 10  # no mid-run eval or checkpoint; the loop still does both at the end
        cfg = load_config(REPO / "configs" / "demo.yaml", [
            f"runs_dir={tmp}", "name=bench", f"pretrain.steps={args.steps}",
            f"pretrain.eval_every={never}", f"pretrain.checkpoint_every={never}"])
        started = time.perf_counter()
        connect(cfg.cluster)
        ray_init_s = time.perf_counter() - started
        prepare_run(cfg)
        make_demo_data(cfg)
        make_tokenizer(cfg)
        make_shards(cfg)
        base = pretrain_task(cfg)
        params = sum(p.numel() for p in base.build_model().parameters())
        cpus = cfg.pretrain.resources.cpus_per_worker
        torch.set_num_threads(int(cpus))  # what Ray gives a worker of cpus_per_worker (OMP_NUM_THREADS)

        runs = {
            "loop alone (in-process)": lambda task, metrics: train(task, Worker(metrics_path=metrics)),
            "Ray Train, 1 worker": lambda task, metrics: run_on_ray_train(
                task, storage=tmp / "checkpoints", metrics_path=metrics),
        }
        results = []
        for i, (label, run) in enumerate(runs.items()):
            task = ThreadsRecorded(cfg, base.tokens_dir, base.tokenizer_dir, out_dir=tmp / f"out{i}")
            started = time.perf_counter()
            run(task, tmp / f"metrics{i}.jsonl")
            wall = time.perf_counter() - started
            results.append((label, task.out_dir.with_suffix(".threads").read_text(), os.getloadavg()[0],
                            *steady_tokens_per_s(tmp / f"metrics{i}.jsonl", args.warmup), wall))

    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}")
    print(f"model {params / 1e6:.1f}M parameters; batch {cfg.pretrain.batch_size} x {cfg.pretrain.seq_len} "
          f"tokens (micro-batch {cfg.pretrain.micro_batch_size}); {args.steps} steps, median of steps "
          f"{args.warmup + 1}-{args.steps}; cpus_per_worker {cpus:g}; ray.init took {ray_init_s:.1f}s "
          "before both runs (in neither wall time); load = 1-min load average after the run")
    print(f"{'run':<24} {'threads':>7} {'load':>5} {'steps':>5} {'tokens/s':>9} {'p90-p10':>8} "
          f"{'vs alone':>9} {'wall s':>7} {'vs alone':>9}")
    _, _, _, alone_rate, _, _, alone_wall = results[0]
    for label, threads, load, rate, spread, steps, wall in results:
        print(f"{label:<24} {threads:>7} {load:5.1f} {steps:>5} {rate:9.0f} {spread:8.1%} "
              f"{rate / alone_rate:8.3f}x {wall:7.1f} {wall / alone_wall:8.2f}x")
    overhead = 1 - results[1][3] / alone_rate
    print(f"Ray Train throughput overhead: {overhead:.1%} (target < 10%: {'met' if overhead < 0.1 else 'NOT met'}); "
          f"wall time {results[1][-1] - alone_wall:+.1f}s (Ray Train start, teardown, checkpoint upload)")


if __name__ == "__main__":
    main()
