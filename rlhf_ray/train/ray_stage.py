"""Run a training `Task` on Ray Train: `TorchTrainer` workers (DDP over gloo or NCCL), checkpoints in
the run's storage, restarts from the last checkpoint when a worker dies."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.placement_group import remove_placement_group

from rlhf_ray.cluster import ResourcesError, reserve
from rlhf_ray.config import Resources
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
    """On a cluster that may grow: wait (saying for what) until the workers fit, or give up."""
    group = reserve(f"{stage_name} ({resources.num_workers} workers)",
                    [per_worker] * resources.num_workers, resources.placement_strategy,
                    resources.placement_timeout_s,
                    log=lambda message: print(f"[{stage_name}] {message}", flush=True))
    remove_placement_group(group)  # Ray Train reserves them again at once


def run_on_ray_train(task: Task, storage: Path, metrics_path: Path, autoscaling: bool = False) -> dict[str, Any]:
    """Train `task` with Ray Train; resumes from `storage` if an earlier run of it left checkpoints."""
    resources = task.stage.resources
    check_resources(task.name, resources, autoscaling)
    per_worker = {"CPU": resources.cpus_per_worker} | ({"GPU": 1} if resources.use_gpu else {})
    if autoscaling:
        wait_for_workers(task.name, resources, per_worker)
    trainer = TorchTrainer(
        train_loop_per_worker=_worker_main,
        train_loop_config={"task": task, "metrics_path": str(metrics_path)},
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
    context = ray.train.get_context()
    worker = Worker(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        metrics_path=Path(config["metrics_path"]),
        report=_report,
        resume_from=_latest_checkpoint,
    )
    train(config["task"], worker)


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
