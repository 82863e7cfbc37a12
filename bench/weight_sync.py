"""Weight sync throughput at three model sizes: streamed, through the object store, vs a memcpy and
vs the engine's own reload.

For each size (random-init Llamas of ~3.5M, ~31M and ~123M parameters, float32, tied embeddings,
a 512-id BPE vocabulary) one PolicyActor and one RolloutActor (vLLM, float32) run on a local Ray
of 2 CPUs started in this process. The policy joins the weight-sync group with the engine's worker
once; then, interleaved (order rotated every repeat) and after one warm-up of each:

 (a) streamed: `policy.send_weights(bucket)` and `engine.receive_weights(v)` in parallel, timed
     from this process: what PPOTrainer.send_weights does (Ray calls, the sender filling its one
     reused bucket buffer, the gloo broadcasts, the receiver's thread receiving one bucket ahead
     of vLLM's reload, the version check, the prefix-cache reset). Buckets of 16 MB
     (ppo.sync_bucket_mb's default) and 256 MB.
 (b) object store: `engine.load_weights(policy.state_dict())` (the state dict through Ray's object
     store, one safetensors blob through vLLM's rpc into the worker, the reload).
 (c) memcpy: `clone` of every tensor of the same state dict, in this process, one thread.
 (d) bare reload: inside the engine's worker, `reload_weights` over the same tensors already in
     that process (loaded from a safetensors file beforehand), timed there: the engine's floor,
     no transport. Run through `collective_rpc` with a function (vLLM 0.32 takes a callable; it
     needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 in the engine).

Diagnostics: the receive alone at each bucket size (weight_sync.receive drained in the worker
without a reload, timed there, while the policy sends), and once per size a cProfile of one bare
reload (which of vLLM's stages take the time).

    .venv/bin/python bench/weight_sync.py [--sizes 4m,30m,120m] [--repeats 7,5,3]
                                          [--buckets-mb 16,256] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import ray  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from rlhf_ray.cluster import ACTOR_ENV  # noqa: E402
from rlhf_ray.config import GPT4_SPLIT_PATTERN, KVCacheConfig, ModelConfig  # noqa: E402
from rlhf_ray.modeling import count_parameters, new_policy, save_model  # noqa: E402
from rlhf_ray.tokenizer import train_bpe  # noqa: E402

SIZES = {  # name -> (hidden, layers, heads, intermediate); head size 64, kv heads = heads
    "4m": (256, 4, 4, 768),  # 3.5M, bench/ppo_loop.py's model (14.3 MB in float32)
    "30m": (512, 9, 8, 1536),  # 30.8M
    "120m": (768, 13, 12, 3072),  # 122.9M
}
# The engine runs functions we send (collective_rpc with a callable): vLLM pickles them only so.
ENGINE_ENV = {"env_vars": {**ACTOR_ENV["env_vars"], "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


# ------------------------------------- run inside the vLLM worker (`self`, collective_rpc's way)


def _rpc(engine: Any, fn: Callable, *args: Any) -> list[Any]:
    """On the RolloutActor (via __ray_call__): run `fn` in every vLLM worker of the engine."""
    return engine.llm.collective_rpc(fn, args=args)


def w_stash(self: Any, path: str) -> int:
    """Load the tensors to reload from a safetensors file into the worker, once."""
    from safetensors.torch import load_file

    self._bench_state = load_file(path)
    return len(self._bench_state)


def w_reload(self: Any, profile: bool = False) -> Any:
    """Seconds of one reload_weights over the stashed tensors; with `profile`, under cProfile:
    its total and the functions with the most cumulative time."""
    import cProfile
    import pstats
    import time

    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    self.reload_weights(weights_iterator=iter(self._bench_state.items()), is_checkpoint_format=True)
    total = time.perf_counter() - start
    if not profiler:
        return total
    profiler.disable()
    rows = [(f"{func} ({file.split('site-packages/')[-1]}:{line})", v[1], v[2], v[3])
            for (file, line, func), v in pstats.Stats(profiler).stats.items()]  # type: ignore[attr-defined]
    return {"total": total, "rows": sorted(rows, key=lambda r: -r[3])[:20]}


def w_receive_only(self: Any) -> float:
    """Seconds to drain one streamed sync (weight_sync.receive) without loading it."""
    import time

    from rlhf_ray.rl import weight_sync

    start = time.perf_counter()
    for _ in weight_sync.receive(self.sync_group, self.sync_device):
        pass
    return time.perf_counter() - start


# ----------------------------------------------------------------- one size


def bench_size(name: str, tokenizer: Any, repeats: int, buckets_mb: list[float], threads: int,
               tmp: Path) -> dict[str, Any]:
    from rlhf_ray.rl.actors import PolicyActor
    from rlhf_ray.rl.rollout import RolloutActor

    hidden, layers, heads, inter = SIZES[name]
    cfg = ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads,
                      intermediate_size=inter, max_seq_len=512)
    model = new_policy(cfg, tokenizer, seed=0)
    params = count_parameters(model)
    model_dir = tmp / name
    save_model(model, tokenizer, model_dir)
    del model

    policy = PolicyActor.options(num_cpus=1, runtime_env=ACTOR_ENV).remote(
        model_dir, lr=1e-5, threads=threads, rank=0, world_size=1, strategy="ddp")
    engine = RolloutActor.options(num_cpus=1, runtime_env=ENGINE_ENV).remote(
        model_dir, max_model_len=512, sequences=4, kv_cache=KVCacheConfig(tokens=2048), seed=0,
        dtype="float32", role=f"bench engine {name}")
    ray.get([policy.ready.remote(), engine.ready.remote()])
    dtype = ray.get(engine.weights_dtype.remote())
    host, port = ray.get(policy.open_weight_sync.remote(2))
    ray.get([policy.join_weight_sync.remote(2, "gloo"),
             engine.join_weight_sync.remote(host, port, 1, 2, "gloo")])
    print(f"[{name}] {params / 1e6:.1f}M parameters; actors up and joined", flush=True)

    state = ray.get(policy.state_dict.remote())
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    stash = tmp / f"{name}-state.safetensors"
    save_file({k: v.clone() for k, v in state.items()}, str(stash))
    assert ray.get(engine.__ray_call__.remote(_rpc, w_stash, str(stash))) == [len(state)]
    versions = iter(range(1, 10**6))

    def streamed(bucket: int) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            ray.get([engine.receive_weights.remote(next(versions)),
                     policy.send_weights.remote(bucket, dtype)])
            return time.perf_counter() - start
        return run

    def receive_only(bucket: int) -> Callable[[], float]:
        def run() -> float:
            got, _ = ray.get([engine.__ray_call__.remote(_rpc, w_receive_only),
                              policy.send_weights.remote(bucket, dtype)])
            return got[0]
        return run

    def object_store() -> float:
        start = time.perf_counter()
        ray.get(engine.load_weights.remote(policy.state_dict.remote(), next(versions)))
        return time.perf_counter() - start

    def memcpy() -> float:
        start = time.perf_counter()
        {k: v.clone() for k, v in state.items()}
        return time.perf_counter() - start

    measures: dict[str, Callable[[], float]] = {
        **{f"streamed {mb:g} MB": streamed(int(mb * 2**20)) for mb in buckets_mb},
        "object store": object_store,
        "memcpy": memcpy,
        "bare reload": lambda: ray.get(engine.__ray_call__.remote(_rpc, w_reload))[0],
        **{f"receive alone (in worker), {mb:g} MB": receive_only(int(mb * 2**20)) for mb in buckets_mb},
    }
    times: dict[str, list[float]] = {k: [] for k in measures}
    order = list(measures)
    for fn in measures.values():  # warm-up
        fn()
    for r in range(repeats):
        for key in order[r % len(order):] + order[: r % len(order)]:
            times[key].append(measures[key]())
        print(f"[{name}] repeat {r + 1}/{repeats}: " + ", ".join(
            f"{k} {v[-1] * 1e3:.0f}ms" for k, v in times.items()) +
            f"; load {os.getloadavg()[0]:.2f}", flush=True)
    profile = ray.get(engine.__ray_call__.remote(_rpc, w_reload, True))[0]
    # the engine still samples after all this
    ray.get(engine.generate.remote([[1, 2, 3]], 4, 0.0, 1.0, next(versions) - 1))
    ray.get(engine.shutdown.remote())
    ray.kill(engine)
    ray.kill(policy)
    stash.unlink()
    return {"params": params, "bytes": nbytes, "profile": profile,
            "times": {k: statistics.median(v) for k, v in times.items()},
            "spread": {k: (min(v), max(v)) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4m,30m,120m", help=f"of {', '.join(SIZES)}")
    parser.add_argument("--repeats", default="7,5,3", help="timed repeats per size (one each, or one for all)")
    parser.add_argument("--buckets-mb", default="16,256", help="streamed bucket sizes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the policy actor")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    repeats = [int(x) for x in args.repeats.split(",")]
    repeats = repeats * len(sizes) if len(repeats) == 1 else repeats
    buckets = [float(x) for x in args.buckets_mb.split(",")]

    # The memcpy runs here on one thread: with two OpenMP threads on a busy 2-core box a clone
    # of 14 MB took 2 ms or 150 ms, depending on whether the second thread was scheduled.
    torch.set_num_threads(1)
    load_before, started = os.getloadavg(), time.perf_counter()
    text = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 20
    tokenizer = train_bpe([text] * 50, vocab_size=512, pattern=GPT4_SPLIT_PATTERN, max_chars=10**9)
    ray.init(num_cpus=2, include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_size(name, tokenizer, reps, buckets, args.threads, Path(tmp))
                   for name, reps in zip(sizes, repeats)]
    ray.shutdown()
    load_after, wall = os.getloadavg(), time.perf_counter() - started

    import vllm

    loads = ["/".join(f"{x:.2f}" for x in load) for load in (load_before, load_after)]
    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"vllm {vllm.__version__}, ray {ray.__version__}; load average (1/5/15 min) before "
          f"{loads[0]}, after {loads[1]}; wall {wall:.0f}s; medians of "
          f"{','.join(map(str, repeats))} repeats after 1 warm-up\n")
    streams = [f"streamed {b:g} MB" for b in buckets]
    cols = streams + ["object store", "memcpy", "bare reload"]
    print("| size | MB | " + " | ".join(f"{c} GB/s" for c in cols) + " | " +
          " | ".join(f"{c} / bare reload" for c in streams) + " |")
    print("|---|---:|" + "---:|" * (len(cols) + len(streams)))
    for r in results:
        t, gb = r["times"], r["bytes"] / 1e9
        print(f"| {r['params'] / 1e6:.1f}M | {r['bytes'] / 1e6:.1f} | " +
              " | ".join(f"{gb / t[c]:.2f}" for c in cols) + " | " +
              " | ".join(f"{t[c] / t['bare reload']:.2f}x" for c in streams) + " |")
    print("\nmedian milliseconds (min-max):\n")
    print("| measure | " + " | ".join(f"{r['params'] / 1e6:.1f}M" for r in results) + " |")
    print("|---|" + "---:|" * len(results))
    for k in results[0]["times"]:
        print(f"| {k} | " + " | ".join(
            f"{r['times'][k] * 1e3:.1f} ({r['spread'][k][0] * 1e3:.0f}-{r['spread'][k][1] * 1e3:.0f})"
            for r in results) + " |")
    for r in results:
        p = r["profile"]
        print(f"\none bare reload of {r['params'] / 1e6:.1f}M under cProfile: {p['total']:.3f}s "
              "(profiling slows python code); by cumulative time:\n")
        print("| function | calls | own s | cumulative s |\n|---|---:|---:|---:|")
        for fn, calls, own, cumulative in p["rows"]:
            print(f"| {fn} | {calls} | {own:.3f} | {cumulative:.3f} |")


if __name__ == "__main__":
    main()
