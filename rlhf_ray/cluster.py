"""Connecting to Ray: an embedded local Ray by default, or an existing cluster."""

from __future__ import annotations

import ray

from rlhf_ray.config import ClusterConfig


def connect(cluster: ClusterConfig) -> None:
    """Start (or join) Ray once per process; a job submitted with `ray job submit` joins its cluster."""
    if ray.is_initialized():
        return
    if cluster.address is None:
        ray.init(num_cpus=cluster.num_cpus, log_to_driver=True)
    else:
        ray.init(address=cluster.address, log_to_driver=True)
