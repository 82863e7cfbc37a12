"""The console of `rlhf-ray` on a real run: on a terminal a progress bar per stage and no Ray
chatter (that goes to <run>/logs/driver.log). Off a terminal, plain progress lines:
tests/integration/test_demo.py; `--verbose`: tests/unit/test_console.py."""

import os
import sys
from pathlib import Path

import pytest

from tests import terminal

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "-m", "rlhf_ray.cli"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def on_a_terminal(args: list[str]) -> str:
    """What a person at a 120-column terminal sees of `rlhf-ray <args>`."""
    return terminal.on_a_terminal([*COMMAND, *args], ENV, cwd=REPO)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def test_on_a_terminal_each_stage_is_a_progress_bar_and_ray_s_logs_go_to_the_run_folder(runs):
    shown = on_a_terminal(["pipeline", "--config", "configs/test.yaml", "--until", "pretrain",
                           "--set", f"runs_dir={runs}", "--set", "cluster.num_cpus=2"])
    bar = [part for part in shown.split("\r") if part.startswith("[pretrain]") and "4/4" in part]
    assert bar and "loss " in bar[-1] and "tok/s" in bar[-1], shown[-2000:]
    assert "[pretrain] done in" in shown and "[pretrain] step 4/4" not in shown
    log = (runs / "test" / "logs" / "driver.log").read_text()
    for chatter in ("Started a local Ray instance", "TrainController"):
        assert chatter in log and chatter not in shown, chatter
