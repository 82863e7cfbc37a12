"""Experiment tracking: each stage's metric rows, under the JSONL's names, to TensorBoard, MLflow
and W&B (the config's `tracking`). The driver feeds them (rlhf_ray/watch.py), never the training
workers, so a slow or dead tracking server cannot stall or kill a training step: a tracker that
fails is warned about once and left off for the rest of the run, and the JSONL stays complete.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from rlhf_ray.config import MLflowConfig, RunConfig, WandbConfig
from rlhf_ray.run import RunFolder

Row = dict[str, Any]


class StageTracker(Protocol):
    """One backend's record of one stage."""

    def log(self, row: Row) -> None: ...

    def finish(self, output: Path | None) -> None:
        """The stage has ended; `output` is its finished folder (None if it failed)."""
        ...


def scalars(row: Row) -> dict[str, float]:
    """The row's numbers, by their JSONL names (the step is the x axis, not a metric)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


def flat_config(cfg: RunConfig) -> dict[str, str]:
    """The config as dotted keys ('ppo.resources.policy.num_cpus') and string values."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        else:
            flat[prefix] = str(value)

    walk("", cfg.model_dump(mode="json"))
    return flat


# --------------------------------------------------------------------------- TensorBoard


class TensorBoardStage:
    """Event files under <run>/tensorboard/<stage>/, one scalar per metric per step."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, row: Row) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=int(row["step"]))
        self.writer.flush()

    def finish(self, output: Path | None) -> None:
        self.writer.close()


# --------------------------------------------------------------------------- MLflow

# The tags that find a run folder's MLflow runs again when a later command (a resumed pipeline,
# another stage's job) logs to them.
RUN_DIR_TAG = "rlhf_ray.run_dir"
STAGE_TAG = "rlhf_ray.stage"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a child run under its parent


def _mlflow_client(settings: MLflowConfig) -> Any:
    # MLflow retries an unreachable server for minutes by default; a few seconds is enough to
    # tell a blip from a server that is down, and the stage's end waits for the last rows.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=settings.tracking_uri)


def _find_run(client: Any, experiment_id: str, tags: dict[str, str]) -> Any | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = client.search_runs([experiment_id], filter_string=query, max_results=1,
                               order_by=["attributes.start_time DESC"])
    return found[0] if found else None


class MLflowStage:
    """The run folder is one MLflow run (named after it, the config as params); each stage is a
    child run of it whose metrics have the JSONL's names. Both are found again by their tags, so
    a resumed pipeline or a stage submitted as its own job logs into the same runs."""

    def __init__(self, settings: MLflowConfig, cfg: RunConfig, stage: str) -> None:
        from mlflow.entities import Param, RunStatus

        self.client, self.settings = _mlflow_client(settings), settings
        self.running = RunStatus.to_string(RunStatus.RUNNING)
        experiment = self.client.get_experiment_by_name(settings.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(settings.experiment))
        run_dir = str(cfg.run_dir)
        parent = _find_run(self.client, experiment_id, {RUN_DIR_TAG: run_dir, STAGE_TAG: "run"})
        if parent is None:
            parent = self.client.create_run(experiment_id, run_name=cfg.name,
                                            tags={RUN_DIR_TAG: run_dir, STAGE_TAG: "run"})
            params = [Param(k, v[:6000]) for k, v in flat_config(cfg).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(parent.info.run_id, params=params[i:i + 100])
        self.parent_id = parent.info.run_id
        tags = {RUN_DIR_TAG: run_dir, STAGE_TAG: stage, PARENT_TAG: self.parent_id}
        child = _find_run(self.client, experiment_id, tags)
        if child is None:
            child = self.client.create_run(experiment_id, run_name=stage, tags=tags)
        else:
            self.client.update_run(child.info.run_id, status=self.running)
        self.run_id = child.info.run_id

    def log(self, row: Row) -> None:
        from mlflow.entities import Metric

        step, now = int(row["step"]), int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, output: Path | None) -> None:
        if output is not None and self.settings.log_models and output.is_dir():
            self.client.log_artifacts(self.run_id, str(output), artifact_path=output.name)
        self.client.set_terminated(self.run_id, "FINISHED" if output is not None else "FAILED")


# --------------------------------------------------------------------------- Weights & Biases


class WandbStage:
    """One W&B run per stage, named <run>/<stage> and grouped by the run folder's name; a resumed
    stage continues its W&B run (W&B drops rows whose step it has already seen)."""

    def __init__(self, settings: WandbConfig, cfg: RunConfig, stage: str) -> None:
        import wandb

        folder = RunFolder(cfg.run_dir).wandb
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings.project, entity=settings.entity, mode=settings.mode,
            dir=str(folder.parent),  # W&B adds wandb/ group=cfg.name, job_type=stage, name=f"{cfg.name}/{stage}",
            id=f"{cfg.name}-{stage}".replace(".", "-"), resume="allow",
            config=cfg.model_dump(mode="json"), reinit="create_new",
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, row: Row) -> None:
        self.run.log(scalars(row), step=int(row["step"]))

    def finish(self, output: Path | None) -> None:
        self.run.finish(exit_code=0 if output is not None else 1)


# --------------------------------------------------------------------------- all of them


# The trackers that failed in this process: warned about once, not tried again for later stages.
_failed: set[str] = set()


class Trackers:
    """Every configured tracker of one stage. A tracker that raises (server down, refused, a
    missing package) is named in one warning and dropped; the others go on."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.warn = warn
        self.active: dict[str, StageTracker] = {}

    def start(self, name: str, make: Callable[[], StageTracker]) -> None:
        if name in _failed:
            return
        try:
            self.active[name] = make()
        except Exception as e:  # noqa: BLE001 - any failure of a tracker leaves the run alone
            self._drop(name, e)

    def log(self, row: Row) -> None:
        for name, tracker in list(self.active.items()):
            try:
                tracker.log(row)
            except Exception as e:  # noqa: BLE001
                self._drop(name, e)

    def finish(self, output: Path | None) -> None:
        for name, tracker in list(self.active.items()):
            try:
                tracker.finish(output)
            except Exception as e:  # noqa: BLE001
                self._drop(name, e)
        self.active.clear()

    def _drop(self, name: str, error: Exception) -> None:
        self.active.pop(name, None)
        _failed.add(name)
        message = " ".join(str(error).split())[:300]
        self.warn(f"tracking: {name} failed ({type(error).__name__}: {message}); going on "
                  "without it, the metrics are still written to metrics/*.jsonl")


def open_trackers(cfg: RunConfig, stage: str, warn: Callable[[str], None]) -> Trackers:
    """The trackers `cfg.tracking` asks for, each started for `stage`."""
    tracking, trackers = cfg.tracking, Trackers(warn)
    if tracking.tensorboard:
        trackers.start("tensorboard", lambda: TensorBoardStage(RunFolder(cfg.run_dir).tensorboard(stage)))
    if tracking.mlflow is not None:
        trackers.start(f"mlflow at {tracking.mlflow.tracking_uri}",
                       lambda: MLflowStage(tracking.mlflow, cfg, stage))
    if tracking.wandb is not None:
        trackers.start(f"wandb ({tracking.wandb.mode})", lambda: WandbStage(tracking.wandb, cfg, stage))
    return trackers
