"""Experiment tracking: the metric rows of each stage go to the trackers under the JSONL's names;
a tracker that fails is named once and left off while the run goes on."""

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf_ray import tracking
from rlhf_ray.config import validate_config
from rlhf_ray.run import RunFolder
from rlhf_ray.tracking import Trackers, flat_config, open_trackers, scalars
from rlhf_ray.watch import watch_stage


@pytest.fixture(autouse=True)
def no_failed_trackers():
    tracking._failed.clear()
    yield
    tracking._failed.clear()


def config(tmp_path: Path, **tracking_settings):
    return validate_config({"name": "t", "runs_dir": str(tmp_path), "sft": {"steps": 3},
                            "tracking": tracking_settings})


def test_a_row_s_numbers_are_its_metrics_and_the_step_is_the_x_axis():
    row = {"step": 3, "loss": 1.5, "workers": 2, "note": "x", "resumed": True}
    assert scalars(row) == {"loss": 1.5, "workers": 2.0}


def test_the_config_is_flattened_to_dotted_params(tmp_path):
    flat = flat_config(config(tmp_path))
    assert flat["sft.steps"] == "3" and flat["name"] == "t"
    assert flat["ppo.resources.policy.num_cpus"] == "0.5"
    assert all(isinstance(v, str) for v in flat.values())


def test_tensorboard_event_files_hold_the_jsonl_rows_under_their_names(tmp_path):
    cfg = config(tmp_path)
    run = RunFolder(cfg.run_dir)
    rows = [{"step": s, "loss": 3.0 / s, "tokens_per_s": 100.0 * s} for s in (1, 2, 3)]
    with watch_stage(cfg, "sft", poll_s=0.05):  # the stage's workers append; the driver follows
        run.metrics("sft").parent.mkdir(parents=True)
        for row in rows:
            with open(run.metrics("sft"), "a") as f:
                f.write(json.dumps(row) + "\n")
    events = EventAccumulator(str(run.tensorboard("sft")))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "tokens_per_s"}
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("loss")] == [(1, 3.0), (2, 1.5), (3, 1.0)]


class Breaks:
    """A tracker whose server went away after its first row."""

    def __init__(self) -> None:
        self.rows = 0

    def log(self, row: dict) -> None:
        self.rows += 1
        if self.rows > 1:
            raise ConnectionError("the server went away")

    def finish(self, output: Path | None) -> None:
        pass


class Keeps:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.finished: list[Path | None] = []

    def log(self, row: dict) -> None:
        self.rows.append(row)

    def finish(self, output: Path | None) -> None:
        self.finished.append(output)


def test_a_failing_tracker_is_warned_about_once_and_the_others_go_on():
    warnings: list[str] = []
    trackers = Trackers(warnings.append)
    breaks, keeps = Breaks(), Keeps()
    trackers.start("mlflow at http://x", lambda: breaks)
    trackers.start("tensorboard", lambda: keeps)
    for step in (1, 2, 3):
        trackers.log({"step": step, "loss": 1.0})
    trackers.finish(Path("sft"))
    assert len(keeps.rows) == 3 and keeps.finished == [Path("sft")]
    assert breaks.rows == 2 and len(warnings) == 1
    assert "mlflow at http://x failed (ConnectionError: the server went away)" in warnings[0]
    assert "metrics/*.jsonl" in warnings[0]
    # The next stage does not try it again, and says nothing more.
    later = Trackers(warnings.append)
    later.start("mlflow at http://x", lambda: Keeps())
    assert later.active == {} and len(warnings) == 1


def test_a_tracker_that_cannot_start_is_named_and_the_run_goes_on(tmp_path):
    def refuse() -> Keeps:
        raise ModuleNotFoundError("No module named 'wandb'")

    warnings: list[str] = []
    trackers = Trackers(warnings.append)
    trackers.start("wandb (offline)", refuse)
    trackers.log({"step": 1, "loss": 1.0})
    assert trackers.active == {} and "wandb (offline) failed (ModuleNotFoundError" in warnings[0]


def test_no_tracker_but_tensorboard_unless_configured(tmp_path):
    trackers = open_trackers(config(tmp_path), "sft", warn=lambda m: None)
    assert list(trackers.active) == ["tensorboard"]
    trackers.finish(None)
    assert list(open_trackers(config(tmp_path, tensorboard=False), "sft", lambda m: None).active) == []
