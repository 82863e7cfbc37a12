"""Experiment tracking on a real pipeline run (Ray Train stages): a local `mlflow server` started
here gets the run folder's run, its config as params and each stage's metrics under the JSONL's
names; TensorBoard's reader finds the same rows; W&B writes its offline run; a tracking server
that is down is named once and the training goes on."""

import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import ray
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf_ray import tracking
from rlhf_ray.config import load_config
from rlhf_ray.pipeline import run_pipeline
from rlhf_ray.run import RunFolder, read_metrics
from rlhf_ray.tracking import PARENT_TAG, RUN_DIR_TAG, STAGE_TAG

pytestmark = pytest.mark.integration

TEST_CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` as a team runs it: a SQL store and an artifact store of its own."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--artifacts-destination", str(folder / "artifacts")],
        stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, (folder / "server.log").read_text()[-3000:]
        time.sleep(1)
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(autouse=True)
def fresh_trackers():
    tracking._failed.clear()
    yield
    tracking._failed.clear()


@pytest.fixture(scope="module", autouse=True)
def one_ray():
    yield
    ray.shutdown()


def test_each_stage_s_metrics_reach_mlflow_tensorboard_and_wandb_under_the_jsonl_names(
        tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    cfg = load_config(TEST_CONFIG, [
        f"runs_dir={tmp_path}", "cluster.num_cpus=2",
        f"tracking.mlflow={{tracking_uri: '{mlflow_server}', experiment: e2e, log_models: true}}",
        "tracking.wandb={mode: offline, project: e2e}"])
    run_pipeline(cfg, until="sft")
    run = RunFolder(cfg.run_dir)

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("e2e")
    parents = client.search_runs([experiment.experiment_id],
                                 f"tags.`{STAGE_TAG}` = 'run' and tags.`{RUN_DIR_TAG}` = '{cfg.run_dir}'")
    assert [p.info.run_name for p in parents] == ["test"]
    parent = parents[0]
    assert parent.data.params["pretrain.steps"] == "4" and parent.data.params["sft.batch_size"] == "8"
    for stage in ("pretrain", "sft"):
        [child] = client.search_runs([experiment.experiment_id],
                                     f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and "
                                     f"tags.`{STAGE_TAG}` = '{stage}'")
        assert child.info.status == "FINISHED" and child.info.run_name == stage
        rows = read_metrics(run.metrics(stage))
        assert len(rows) == 4
        numbers = {k for row in rows for k, v in row.items() if k != "step"
                   and isinstance(v, int | float) and not isinstance(v, bool)}
        assert numbers <= set(child.data.metrics) and "eval_loss" in child.data.metrics
        history = sorted((m.step, m.value) for m in client.get_metric_history(child.info.run_id, "loss"))
        assert [step for step, _ in history] == [r["step"] for r in rows]
        assert [value for _, value in history] == pytest.approx([r["loss"] for r in rows])
        artifacts = [a.path for a in client.list_artifacts(child.info.run_id, run.output(stage).name)]
        assert f"{run.output(stage).name}/model.safetensors" in artifacts  # log_models: true

        events = EventAccumulator(str(run.tensorboard(stage)))
        events.Reload()
        assert numbers <= set(events.Tags()["scalars"])
        assert [e.step for e in events.Scalars("loss")] == [r["step"] for r in rows]
        assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in rows])

    # W&B offline: one run per stage in the run folder, for `wandb sync` later, with the rows.
    offline = sorted(run.wandb.glob("offline-run-*"))
    assert [p.name.rsplit("-", 1)[-1] for p in offline] == ["pretrain", "sft"], offline
    for stage, folder in zip(("pretrain", "sft"), offline):
        history = wandb_history(next(folder.glob("*.wandb")))
        rows = read_metrics(run.metrics(stage))
        assert [h["step"] for h in history] == [r["step"] for r in rows], history
        assert [h["loss"] for h in history] == pytest.approx([r["loss"] for r in rows])


def test_a_tracking_server_that_is_down_is_named_once_and_training_goes_on(tmp_path, capsys):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = load_config(TEST_CONFIG, [f"runs_dir={tmp_path}", "cluster.num_cpus=2",
                                    f"tracking.mlflow={{tracking_uri: '{down}'}}"])
    run_pipeline(cfg, until="pretrain")
    out = capsys.readouterr().out
    assert out.count(f"mlflow at {down} failed") == 1, out
    run = RunFolder(cfg.run_dir)
    assert [r["step"] for r in read_metrics(run.metrics("pretrain"))] == [1, 2, 3, 4]
    assert (run.output("pretrain") / "model.safetensors").exists()
    events = EventAccumulator(str(run.tensorboard("pretrain")))  # the other tracker went on
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


def wandb_history(path: Path) -> list[dict]:
    """The history rows of a W&B run file: a ':W&B' header, then LevelDB log records (32 KiB
    blocks, each record a 7-byte header and a piece of a protobuf `Record`)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:8]
    rows, pos, pieces = [], 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # the rest of the block is padding
            pos += left
            continue
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            record = wandb_internal_pb2.Record.FromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                rows.append({"step": record.history.step.num, **row})
    return rows
