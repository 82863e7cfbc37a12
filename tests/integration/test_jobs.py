"""The pipeline as a Ray job on a cluster of two nodes, started on this machine the way a real one
is (`ray start --head`, then `ray start --address ...` with its own resources), and submitted with
`ray job submit`: it runs on both nodes, a resubmission resumes, and bad requests fail clearly."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Token authentication, as Ray 2.60 clusters have by default; every command below shares the token.
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}


dashboard_gcs_port: list[str] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout_s, cwd=REPO)


@pytest.fixture(scope="module")
def dashboard():
    """A head node and a worker node (2 CPUs each, the worker with a `second_node` resource)."""
    # `ray stop` ends every Ray on the machine: a Ray this process still holds would take the
    # test run down with it (its raylet dies and the driver exits), so that is refused first.
    assert not ray.is_initialized(), "a Ray from an earlier test's fixture is still running here"
    ray_cli("stop", "--force")
    ray_cli("get-auth-token", "--generate")
    port, dashboard_port = free_port(), free_port()
    dashboard_gcs_port[:] = [str(port)]
    head = ray_cli("start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
                   f"--dashboard-port={dashboard_port}", "--disable-usage-stats")
    assert head.returncode == 0, head.stderr[-3000:]
    worker = ray_cli("start", f"--address=127.0.0.1:{port}", "--num-cpus=2",
                     '--resources={"second_node": 1}', "--disable-usage-stats")
    assert worker.returncode == 0, worker.stderr[-3000:]
    address = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + 60
    while len(listing(address, "nodes")) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    yield address
    ray_cli("stop", "--force")


@pytest.fixture(scope="module")
def gcs(dashboard):
    """The head's address for drivers (`ray.init(address=...)`)."""
    return "127.0.0.1:" + dashboard_gcs_port[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The runs folder the pipeline jobs write to (shared by this module's tests)."""
    return tmp_path_factory.mktemp("runs")


def listing(address: str, kind: str) -> list[dict]:
    """`ray list <kind>` of the cluster (its state API), every entry in detail."""
    out = ray_cli("list", kind, f"--address={address}", "--detail", "--format=json", "--limit=10000")
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def submit(address: str, submission_id: str, entrypoint: list[str], limit_s: float = 900) -> tuple[str, str]:
    """`ray job submit` (it waits for the job); the job's final status and its logs. A job still
    running after limit_s is stopped, since it would go on using the cluster the next test gets,
    and fails the test with its logs."""
    try:
        ray_cli("job", "submit", f"--address={address}", f"--submission-id={submission_id}",
                "--runtime-env=jobs/runtime_env.yaml", "--", sys.executable, *entrypoint, timeout_s=limit_s)
    except subprocess.TimeoutExpired:
        ray_cli("job", "stop", f"--address={address}", submission_id)
        logs = ray_cli("job", "logs", f"--address={address}", submission_id).stdout
        pytest.fail(f"job {submission_id} still running after {limit_s:.0f}s:\n{logs[-4000:]}")
    status = ray_cli("job", "status", f"--address={address}", submission_id)
    found = re.search(r"Job '[^']+' (\w+)", status.stdout + status.stderr)
    assert found, status.stdout + status.stderr
    return found.group(1).upper(), ray_cli("job", "logs", f"--address={address}", submission_id).stdout


def test_the_pipeline_runs_on_both_nodes_and_a_resubmission_resumes(dashboard, runs):
    pipeline = ["jobs/pipeline.py", "--config", "configs/test.yaml", "--set", f"runs_dir={runs}",
                "--set", "ppo.resources.placement_strategy=SPREAD"]
    status, logs = submit(dashboard, "pipeline-1", pipeline)
    assert status == "SUCCEEDED", logs[-4000:]
    run = runs / "test"
    for folder in ("tokenizer", "base", "sft", "reward", "rlhf"):
        assert (run / folder / "config.json").is_file() or (run / folder / "tokenizer.json").is_file()
    nodes = {n["node_id"] for n in listing(dashboard, "nodes")}
    used = {a["node_id"] for a in listing(dashboard, "actors")
            if a["class_name"] in ("RolloutEngine", "PolicyRole", "ValueRole", "ReferenceRole",
                                   "RewardModelRole", "RayTrainWorker")}
    assert used == nodes and len(nodes) == 2

    status, logs = submit(dashboard, "pipeline-2", pipeline)
    assert status == "SUCCEEDED", logs[-4000:]
    for stage, folder in [("tokenizer", "tokenizer"), ("pretrain", "base"), ("sft", "sft"),
                          ("reward", "reward"), ("ppo", "rlhf")]:
        assert f"[{stage}] {run / folder} exists, skipped" in logs


def test_serve_replicas_the_cluster_cannot_place_are_explained_and_removed(dashboard, gcs, runs):
    run = runs / "test"
    if not (run / "sft" / "config.json").exists():
        pytest.skip("needs the run of the pipeline test above")
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_ray.cli", "serve", "--run", str(run), "--address", gcs,
         "--port", str(free_port()), "--set", "serve.gpus_per_replica=1",
         "--set", "serve.start_timeout_s=35"],
        env={**ENV, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 2, out.stderr[-3000:]
    # Said once 30 s have passed (the measured wait, so 31 s on a busy machine).
    assert re.search(r"\[serve\] serving waiting 3[0-4]s for stage-base, stage-rlhf, stage-sft "
                     r"\(each replica \{CPU 0.5, GPU 1\}\)", out.stdout), out.stdout[-3000:]
    assert "no node can hold a bundle of {CPU 0.5, GPU 1}" in out.stderr
    assert "gave up after serve.start_timeout_s=35" in out.stderr
    status = subprocess.run([str(BIN / "serve"), "status", f"--address={dashboard}"], env=ENV,
                            capture_output=True, text=True, timeout=120).stdout
    assert "rlhf-ray" not in status or "DELETING" in status, status  # being removed again


def test_a_relative_runs_dir_fails_the_job_with_the_reason(dashboard):
    status, logs = submit(dashboard, "relative-runs", ["jobs/pipeline.py", "--config", "configs/test.yaml"])
    assert status == "FAILED"
    assert "rlhf-ray job: error: runs_dir resolves to " in logs
    assert "inside this job's temporary copy of its working_dir" in logs


def test_asking_for_gpus_the_cluster_lacks_says_what_it_waits_for_and_gives_up(dashboard, tmp_path):
    status, logs = submit(dashboard, "no-gpus", [
        "jobs/stage.py", "pretrain", "--config", "configs/test.yaml", "--set", f"runs_dir={tmp_path}",
        "--set", "pretrain.resources.use_gpu=true", "--set", "pretrain.resources.placement_timeout_s=5"])
    assert status == "FAILED"
    assert "pretrain (2 workers) waiting 5s for {CPU 0.5, GPU 1} + {CPU 0.5, GPU 1}" in logs
    assert "no node can hold a bundle of {CPU 0.5, GPU 1} (the largest has {CPU 2, GPU 0})" in logs
    assert "gave up after 5s (the stage's placement_timeout_s)" in logs
    assert not (tmp_path / "test" / "base").exists()
