"""Run a training `Task` on Ray Train: `TorchTrainer` workers (DDP over gloo or NCCL), checkpoints in
the run's storage, restarts from the last checkpoint when a worker dies."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray import cloudpickle
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray.cluster import NoCudaError, ResourcesError, require_cuda, reserve
from rlhf_ray.config import Resources
from rlhf_ray.console import say
from rlhf_ray.train.loop import Task, Worker, train


def check_resources(stage_name: str, resources: Resources, autoscaling: bool) -> None:
    """Fail before starting when the workers cannot fit (Ray Train would otherwise wait forever)."""
    need_cpu = resources.num_workers * resources.cpus_per_worker
    need_gpu = resources.num_workers if resources.use_gpu else 0
    have = ray.cluster_resources()
    short = []
    if need_cpu > have.get("CPU", 0):
        short.append(f"{need_cpu:g} CPUs ({resources.num_workers} workers x "
                     f"{resources.cpus_per_worker:g}) but the cluster has {have.get('CPU', 0):g}")
    if need_gpu > have.get("GPU", 0):
        short.append(f"{need_gpu} GPUs but the cluster has {have.get('GPU', 0):g}")
    if short and not autoscaling:
        raise ResourcesError(f"{stage_name}.resources asks for " + "; and ".join(short)
                             + f": lower {stage_name}.resources.num_workers or cpus_per_worker, "
                             "or add nodes")


def wait_for_workers(stage_name: str, resources: Resources, per_worker: dict[str, float]) -> None:
    """Wait (saying for what) until the workers fit, or give up (on a cluster that may grow);
    with GPUs, check that each worker's node can use CUDA before Ray Train starts on it."""
    group = reserve(f"{stage_name} ({resources.num_workers} workers)",
                    [per_worker] * resources.num_workers, resources.placement_strategy,
                    resources.placement_timeout_s,
                    log=lambda message: say(f"[{stage_name}] {message}"))
    try:
        if resources.use_gpu:
            check_cuda_in(group, stage_name, resources.num_workers)
    finally:
        remove_placement_group(group)  # Ray Train reserves them again at once


@ray.remote(num_cpus=0)
def _require_cuda(what: str) -> None:
    require_cuda(what)


def check_cuda_in(group: PlacementGroup, stage_name: str, workers: int) -> None:
    """require_cuda in each worker's bundle, where Ray Train will place that worker. Ray Train sets
    up NCCL before the training function runs, so on a node without CUDA the worker itself would
    only ever report NCCL's error."""
    checks = [_require_cuda.options(num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=rank)).remote(f"{stage_name} worker {rank}")
        for rank in range(workers)]
    try:
        ray.get(checks)
    except NoCudaError as e:
        raise NoCudaError(str(getattr(e, "cause", e))) from None  # without the remote traceback


# How often Ray Train's controller polls its workers (Ray's default: 2 s). It hears of a finished
# stage at its next poll, so at 0.5 s each stage ends 1-3 s sooner on the demo (bench/RESULTS.md);
# a value set in the environment wins.
POLL_INTERVAL_S = "0.5"


def run_on_ray_train(task: Task, storage: Path, metrics_path: Path, autoscaling: bool = False) -> dict[str, Any]:
    """Train `task` with Ray Train; resumes from `storage` if an earlier run of it left checkpoints."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", POLL_INTERVAL_S)  # passed on to the controller
    resources = task.stage.resources
    check_resources(task.name, resources, autoscaling)
    per_worker = {"CPU": resources.cpus_per_worker} | ({"GPU": 1} if resources.use_gpu else {})
    if autoscaling or resources.use_gpu:
        wait_for_workers(task.name, resources, per_worker)
    trainer = TorchTrainer(
        train_loop_per_worker=_worker_main,
        # The task travels as bytes: Ray Train hands train_loop_config to its controller as well,
        # which would otherwise import the task's modules (transformers...) only to hold it.
        train_loop_config={"task": cloudpickle.dumps(task), "metrics_path": str(metrics_path)},
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker=per_worker,
                                     placement_strategy=resources.placement_strategy),
        run_config=ray.train.RunConfig(
            name=task.name,
            storage_path=str(Path(storage).resolve()),
            failure_config=FailureConfig(max_failures=task.stage.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    return dict(result.metrics or {})


def _worker_main(config: dict[str, Any]) -> None:
    task: Task = cloudpickle.loads(config["task"])
    context = ray.train.get_context()
    require_cuda(f"{task.name} worker {context.get_world_rank()}")
    worker = Worker(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        metrics_path=Path(config["metrics_path"]),
        report=_report,
        resume_from=_latest_checkpoint,
    )
    train(task, worker)


def _report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
    checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint)


@contextmanager
def _latest_checkpoint() -> Iterator[str | None]:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield folder
