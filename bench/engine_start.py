"""How long a rollout engine takes to start on a machine new to vLLM, with and without vLLM
inspecting the policy's class in the engine's own process.

Before an engine starts, vLLM asks which interfaces the model's class implements. Unless its cache
(VLLM_CACHE_ROOT/modelinfos) holds the answer, it asks a new Python process, which imports vLLM and
torch again; `RolloutEngine` has vLLM inspect the class in its own process instead
(rlhf_ray.modeling.inspect_policies_in_vllms_process). Each run starts a `RolloutActor` on the demo's
model shape (a fresh policy) with an empty cache of its own, the two ways alternating; the time is
from the actor's creation to its engine being ready.

    .venv/bin/python bench/engine_start.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

from rlhf_ray.cluster import connect
from rlhf_ray.config import load_config
from rlhf_ray.modeling import new_policy, save_model
from rlhf_ray.pipeline import make_demo_data, make_tokenizer, prepare_run
from rlhf_ray.rl import rollout
from rlhf_ray.rl.rollout import RolloutActor, RolloutEngine

REPO = Path(__file__).resolve().parent.parent


@ray.remote
class InspectedElsewhere(RolloutEngine):
    """RolloutActor as it was before: the engine core in the actor's process, the model's class
    inspected where vLLM's default puts it (a new process)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        rollout.inspect_policies_in_vllms_process = lambda: None
        super().__init__(*args, **kwargs)


def start_seconds(actor_class: Any, model_dir: Path, cache: Path) -> tuple[float, bool]:
    """Seconds until the engine is ready, and whether vLLM wrote its model-info cache."""
    started = time.perf_counter()
    actor = actor_class.options(num_cpus=1, runtime_env={"env_vars": {"VLLM_CACHE_ROOT": str(cache)}}
                                ).remote(model_dir, max_model_len=256, sequences=64)
    try:
        ray.get(actor.ready.remote())
        seconds = time.perf_counter() - started
        ray.get(actor.shutdown.remote())
    finally:
        ray.kill(actor)
    return seconds, (cache / "modelinfos").exists()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = load_config(REPO / "configs" / "demo.yaml", [f"runs_dir={tmp}", "name=bench"])
        connect(cfg.cluster)
        prepare_run(cfg)
        make_demo_data(cfg)
        tokenizer = make_tokenizer(cfg)
        model_dir = tmp / "policy"
        save_model(new_policy(cfg.model, tokenizer), tokenizer, model_dir)
        ways = {"vLLM's default (a new process)": InspectedElsewhere, "in the engine's process": RolloutActor}
        seconds: dict[str, list[float]] = {way: [] for way in ways}
        wrote: dict[str, bool] = {}
        for round_ in range(args.rounds):
            for index, (way, actor_class) in enumerate(ways.items()):
                took, wrote[way] = start_seconds(actor_class, model_dir, tmp / f"cache{round_}-{index}")
                seconds[way].append(took)

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"\nmachine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}; {args.rounds} rounds, "
          "each engine with an empty vLLM cache")
    print(f"{'model class inspected':<32} {'start s (each)':>20} {'median':>7} {'vs default':>10} {'cache written':>14}")
    default = statistics.median(seconds[next(iter(ways))])
    for way, runs in seconds.items():
        median = statistics.median(runs)
        print(f"{way:<32} {' '.join(f'{s:.1f}' for s in runs):>20} {median:7.1f} "
              f"{median / default:9.2f}x {str(wrote[way]):>14}")


if __name__ == "__main__":
    main()
