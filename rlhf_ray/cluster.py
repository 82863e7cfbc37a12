"""Connecting to Ray: an embedded local Ray by default, or an existing cluster."""

from __future__ import annotations

import ray

from rlhf_ray.config import ClusterConfig


# The runtime_env of our actors and replicas. vLLM's per-request INFO lines and transformers'
# progress bars would bury the driver's own progress lines; OpenMP threads that spin-wait after a
# forward pass slow down the next role's work on the same cores 2x (bench/RESULTS.md).
ACTOR_ENV = {"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                          "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1",
                          "OMP_WAIT_POLICY": "PASSIVE"}}


def connect(cluster: ClusterConfig) -> None:
    """Start (or join) Ray once per process; a job submitted with `ray job submit` joins its cluster."""
    if ray.is_initialized():
        return
    if cluster.address is None:
        ray.init(num_cpus=cluster.num_cpus, log_to_driver=True)
    else:
        ray.init(address=cluster.address, log_to_driver=True)
