"""Cores of their own for the vLLM workers of a CPU node.

On a CPU, vLLM binds each engine worker's threads to cores of its NUMA node and leaves the rest
("reserved") to everything else: the engine's scheduler process and the server in front of it
(vllm/utils/ompmultiprocessing.py). Behind Serve there is more of everything else (the HTTP
proxy, the controller, the replicas, Ray's GCS and dashboard), and left to float, those processes
land on the workers' cores and preempt the one thread that computes each token. On 2 cores that
cost 15% of the tokens per second at one streaming client and 35% at eight (bench/RESULTS.md).

So once a stage's engine is up, its replica moves Serve's processes on its node (its own, the
proxy's, the controller's, the other replicas') and the engines' scheduler processes to the
cores no worker is bound to. The reward model's replica, which computes there with torch, and
other actors (a PPO trainer, say) keep the cores they were given; the raylet keeps all of them,
since every process it starts inherits its cores.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from rlhf_ray.run import REWARD_MODEL
from serve.deployment import deployment_name

# The node's processes (the raylet's descendants) kept off the workers' cores: Serve's actors
# (HAProxy and its manager too, where Serve runs them instead of its proxy), Ray's agents and
# vLLM's scheduler processes, by their titles as `ps` shows them.
OFF_WORKER_CORES = ("ray::ServeController", "ray::ProxyActor", "ray::HAProxyManager", "haproxy",
                    "ray::ServeReplica", "VLLM::EngineCore", "ray::DashboardAgent",
                    "ray::RuntimeEnvAgent")


def worker_cores(vllm_config: Any) -> set[int]:
    """The cores vLLM binds this engine's workers to (as its executor computed them from the
    cores the calling thread may use); empty where it binds none (a GPU, or
    VLLM_CPU_OMP_THREADS_BIND=nobind)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return set()
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    manager = OMPProcessManager(vllm_config)
    return set() if manager.skip_setup else {cpu for cpus in manager.cpu_lists for cpu in cpus}


# Replicas that compute with torch threads of their own keep the cores Ray gave them.
COMPUTES_HERE = (deployment_name(REWARD_MODEL),)


def to_move(processes: Iterable[tuple[int, str]]) -> list[int]:
    """Of the node's processes as (pid, title), those to keep off the workers' cores. A replica's
    title is `ray::ServeReplica:<app>:<deployment>[.<method>]`."""
    return [pid for pid, title in processes
            if title.startswith(OFF_WORKER_CORES) and replica_of(title) not in COMPUTES_HERE]


def replica_of(title: str) -> str | None:
    """The deployment a Serve replica's process title names (None for other processes)."""
    app, _, deployment = title.removeprefix("ray::ServeReplica:").partition(":")
    return deployment.split(".")[0] if title.startswith("ray::ServeReplica:") and app else None


def node_cores() -> set[int]:
    """Every core this process's node lets Ray use: the raylet's (each Ray worker's parent),
    which nothing here ever moves."""
    try:
        return os.sched_getaffinity(os.getppid())
    except OSError:
        return os.sched_getaffinity(0)


@contextmanager
def all_node_cores() -> Iterator[None]:
    """Run the block (an engine starting) on every core of the node: the engine's processes
    inherit the calling thread's cores, and vLLM binds its workers among those."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, node_cores())
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def keep_off_worker_cores(busy: set[int]) -> int:
    """Move the processes of `to_move` (every thread of each) to the node's cores outside `busy`;
    returns how many processes moved. Nothing moves when no core is left over."""
    import psutil

    free = node_cores() - busy
    if not busy or not free:
        return 0
    titles = []
    for process in psutil.Process(os.getppid()).children(recursive=True):  # the raylet's
        try:
            titles.append((process.pid, process.name()))
        except psutil.Error:
            pass
    return move_threads(to_move(titles), free)


def move_threads(pids: Iterable[int], cores: set[int]) -> int:
    """Put every thread of each process on `cores`; returns how many processes moved."""
    moved = 0
    for pid in pids:
        try:
            for thread in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(thread), cores)
            moved += 1
        except (OSError, ValueError):  # gone meanwhile, or not ours to move
            pass
    return moved
