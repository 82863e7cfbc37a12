"""The pipeline as a Ray job on an autoscaling cluster: cluster-local.yaml, started on this machine
the way a real one is (`ray start --head --autoscaling-config ...`) with Ray's fake multi-node
provider, whose nodes are real raylets. The head takes no work and every worker type starts at
zero, so the autoscaler must add nodes for the Ray Train stages, for PPO's placement group, for
Serve's replicas under load and for a stage that asks for GPUs, and remove them when idle.
Jobs are submitted with `ray job submit`; a resubmission resumes, and bad requests fail clearly."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import ray
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Token authentication, as Ray 2.60 clusters have by default; every command below shares the token.
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
LOCAL_CLUSTER = yaml.safe_load((REPO / "cluster-local.yaml").read_text())
IDLE_TIMEOUT_S = 60 * LOCAL_CLUSTER["idle_timeout_minutes"]
PPO_ROLES = ("RolloutActor", "PolicyRole", "ValueRole", "ReferenceRole", "RewardModelRole")


dashboard_gcs_port: list[str] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, timeout_s: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env or ENV, capture_output=True, text=True,
                          timeout=timeout_s, cwd=REPO)


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """The head of cluster-local.yaml (no CPUs), its autoscaler checking every second."""
    # `ray stop` ends every Ray on the machine: a Ray this process still holds would take the
    # test run down with it (its raylet dies and the driver exits), so that is refused first.
    assert not ray.is_initialized(), "a Ray from an earlier test's fixture is still running here"
    ray_cli("stop", "--force")
    ray_cli("get-auth-token", "--generate")
    port, dashboard_port = free_port(), free_port()
    dashboard_gcs_port[:] = [str(port)]
    config = {**LOCAL_CLUSTER, "provider": {**LOCAL_CLUSTER["provider"], "gcs_address": f"127.0.0.1:{port}"}}
    config_path = tmp_path_factory.mktemp("cluster") / "cluster-local.yaml"
    config_path.write_text(yaml.safe_dump(config))
    head = ray_cli("start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=true",
                   f"--dashboard-port={dashboard_port}", f"--autoscaling-config={config_path}",
                   "--disable-usage-stats",
                   env={**ENV, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    assert head.returncode == 0, head.stderr[-3000:]
    yield f"http://127.0.0.1:{dashboard_port}"
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


def submit(address: str, submission_id: str, entrypoint: list[str], limit_s: float = 900,
           upload: bool = False) -> tuple[str, str]:
    """`ray job submit` (it waits for the job); the job's final status and its logs. A job still
    running after limit_s is stopped, since it would go on using the cluster the next test gets,
    and fails the test with its logs.

    The job's working_dir is this checkout in place (`local://`: code every node already has, as
    on nodes that share a disk or an image) unless `upload`: the fake nodes share this machine's
    /tmp/ray, where each node's runtime-env agent unpacks an uploaded working_dir into the same
    folder, replacing it under the workers of the nodes started before (a job that adds no node
    is not affected)."""
    working_dir = [] if upload else [f"--working-dir=local://{REPO}"]
    try:
        ray_cli("job", "submit", f"--address={address}", f"--submission-id={submission_id}",
                "--runtime-env=jobs/runtime_env.yaml", *working_dir, "--", sys.executable,
                *entrypoint, timeout_s=limit_s)
    except subprocess.TimeoutExpired:
        ray_cli("job", "stop", f"--address={address}", submission_id)
        logs = ray_cli("job", "logs", f"--address={address}", submission_id).stdout
        pytest.fail(f"job {submission_id} still running after {limit_s:.0f}s:\n{logs[-4000:]}")
    status = ray_cli("job", "status", f"--address={address}", submission_id)
    found = re.search(r"Job '[^']+' (\w+)", status.stdout + status.stderr)
    assert found, status.stdout + status.stderr
    return found.group(1).upper(), ray_cli("job", "logs", f"--address={address}", submission_id).stdout


def workers(address: str) -> list[dict]:
    """Every worker node the autoscaler has started, those it removed since included."""
    return [n for n in listing(address, "nodes") if not n["is_head_node"]]


def alive(nodes: list[dict]) -> list[dict]:
    return [n for n in nodes if n["state"] == "ALIVE"]


def wait_for_no_workers(address: str) -> float:
    """Seconds until the autoscaler has removed every worker node (idle for IDLE_TIMEOUT_S)."""
    start = time.monotonic()
    while running := alive(workers(address)):
        assert time.monotonic() - start < IDLE_TIMEOUT_S + 90, f"still running: {running}"
        time.sleep(2)
    return time.monotonic() - start


def test_the_pipeline_job_grows_the_cluster_from_no_workers_and_it_shrinks_back(dashboard, runs):
    assert workers(dashboard) == []
    pipeline = ["jobs/pipeline.py", "--config", "configs/test.yaml", "--set", f"runs_dir={runs}"]
    started = time.monotonic()
    status, logs = submit(dashboard, "pipeline-1", pipeline)
    assert status == "SUCCEEDED", logs[-4000:]
    job_s = time.monotonic() - started
    run = runs / "test"
    for folder in ("tokenizer", "base", "sft", "reward", "rlhf"):
        assert (run / folder / "config.json").is_file() or (run / folder / "tokenizer.json").is_file()
    added = {n["node_id"]: n for n in workers(dashboard)}
    actors = listing(dashboard, "actors")
    train = {a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker"}
    ppo = {a["node_id"] for a in actors if a["class_name"] in PPO_ROLES}
    # Nothing ran on the head (it has no CPUs): the Train workers and the PPO roles ran on nodes
    # the autoscaler added; PPO's placement group (2 CPUs of roles) on two 1-CPU nodes.
    assert train and train <= set(added)
    assert len(ppo) == 2 and ppo <= set(added)
    assert all("GPU" not in n["resources_total"] for n in added.values())  # CPU stages, CPU nodes

    status, logs = submit(dashboard, "pipeline-2", pipeline)
    assert status == "SUCCEEDED", logs[-4000:]
    for stage, folder in [("tokenizer", "tokenizer"), ("pretrain", "base"), ("sft", "sft"),
                          ("reward", "reward"), ("ppo", "rlhf")]:
        assert f"[{stage}] {run / folder} exists, skipped" in logs
    shrink_s = wait_for_no_workers(dashboard)
    print(f"pipeline job {job_s:.0f}s on {len(added)} nodes added; all removed {shrink_s:.0f}s "
          f"after the second job (idle timeout {IDLE_TIMEOUT_S:g}s)")


def serve_token() -> str:
    return ray_cli("get-auth-token").stdout.strip()


def replicas(address: str, token: str, deployment: str) -> list[dict]:
    """The replicas of a deployment (state, node) from Serve's REST API on the dashboard."""
    details = httpx.get(f"{address}/api/serve/applications/", timeout=30,
                        headers={"authorization": f"Bearer {token}"}).raise_for_status().json()
    return [r for app in details["applications"].values()
            for name, d in app["deployments"].items() if name == deployment for r in d["replicas"]]


def stream_until(stop: threading.Event, url: str, outcomes: list[str]) -> None:
    """One client streaming chat completions back to back until `stop`, each outcome noted:
    'ok' for a 200 stream that ended with [DONE], anything else as what went wrong."""
    body = {"model": "sft", "messages": [{"role": "user", "content": "Tell me about Norway."}],
            "max_tokens": 64, "stream": True}
    with httpx.Client(timeout=120) as http:
        while not stop.is_set():
            try:
                with http.stream("POST", f"{url}/chat/completions", json=body) as response:
                    text = response.read().decode()
                outcomes.append("ok" if response.status_code == 200 and "data: [DONE]" in text
                                else f"{response.status_code}: {text[-300:]}")
            except httpx.HTTPError as e:
                outcomes.append(repr(e))


def test_serve_under_load_adds_a_replica_on_a_node_the_autoscaler_adds_and_both_go_after(
        dashboard, gcs, runs):
    run = runs / "test"
    if not (run / "sft" / "config.json").exists():
        pytest.skip("needs the run of the pipeline test above")
    port, token, started = free_port(), serve_token(), time.monotonic()
    # One CPU per replica: each replica takes a node of its own.
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_ray.cli", "serve", "--run", str(run), "--address", gcs,
         "--port", str(port), "--set", "serve.stages=[sft]", "--set", "serve.cpus_per_replica=1",
         "--set", "serve.max_replicas=2", "--set", "serve.target_ongoing_requests=1",
         "--set", "serve.upscale_delay_s=1", "--set", "serve.downscale_delay_s=5",
         "--set", "serve.look_back_period_s=12"],
        env={**ENV, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert [r["state"] for r in replicas(dashboard, token, "stage-sft")] == ["RUNNING"]
    assert len(alive(workers(dashboard))) == 1

    stop, outcomes = threading.Event(), []
    clients = [threading.Thread(target=stream_until, args=(stop, f"http://127.0.0.1:{port}/sft/v1", outcomes))
               for _ in range(4)]
    for client in clients:
        client.start()
    try:
        deadline = time.monotonic() + 300
        while len(running := [r for r in replicas(dashboard, token, "stage-sft")
                              if r["state"] == "RUNNING"]) < 2:
            assert time.monotonic() < deadline, f"no second replica: {replicas(dashboard, token, 'stage-sft')}"
            time.sleep(2)
        served_before = len(outcomes)
        while len(outcomes) < served_before + 8:  # both replicas take requests for a while
            assert time.monotonic() < deadline
            time.sleep(1)
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=120)
    scaled_s = time.monotonic() - started
    assert len({r["node_id"] for r in running}) == 2
    assert {r["node_id"] for r in running} <= {n["node_id"] for n in alive(workers(dashboard))}
    assert outcomes and all(o == "ok" for o in outcomes), [o for o in outcomes if o != "ok"][:5]

    # Load gone: Serve removes the extra replica, then the autoscaler its idle node.
    deadline = time.monotonic() + 300 + IDLE_TIMEOUT_S  # 70 s here; slower boxes vary
    while len(replicas(dashboard, token, "stage-sft")) > 1 or len(alive(workers(dashboard))) > 1:
        assert time.monotonic() < deadline, (replicas(dashboard, token, "stage-sft"), alive(workers(dashboard)))
        time.sleep(2)
    subprocess.run([str(BIN / "serve"), "shutdown", "-y", f"--address={dashboard}"], env=ENV,
                   capture_output=True, timeout=120)
    print(f"{len(outcomes)} streams, none failed; 2 replicas on 2 added nodes after {scaled_s:.0f}s; "
          f"back to 1 after {time.monotonic() - started - scaled_s:.0f}s more")


def test_serve_replicas_the_cluster_cannot_place_are_explained_and_removed(dashboard, gcs, runs):
    run = runs / "test"
    if not (run / "sft" / "config.json").exists():
        pytest.skip("needs the run of the pipeline test above")
    # No node type has 2 GPUs, so the autoscaler cannot help either.
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_ray.cli", "serve", "--run", str(run), "--address", gcs,
         "--port", str(free_port()), "--set", "serve.gpus_per_replica=2",
         "--set", "serve.start_timeout_s=35"],
        env={**ENV, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 2, out.stderr[-3000:]
    # Said once 30 s have passed (the measured wait, so 31 s on a busy machine).
    assert re.search(r"\[serve\] serving waiting 3[0-4]s for stage-base, stage-rlhf, stage-sft "
                     r"\(each replica \{CPU 0.5, GPU 2\}\)", out.stdout), out.stdout[-3000:]
    assert "no node can hold a bundle of {CPU 0.5, GPU 2}" in out.stderr
    assert "gave up after serve.start_timeout_s=35" in out.stderr
    status = subprocess.run([str(BIN / "serve"), "status", f"--address={dashboard}"], env=ENV,
                            capture_output=True, text=True, timeout=120).stdout
    assert "rlhf-ray" not in status or "DELETING" in status, status  # being removed again


def test_a_relative_runs_dir_fails_the_job_with_the_reason(dashboard):
    status, logs = submit(dashboard, "relative-runs", ["jobs/pipeline.py", "--config", "configs/test.yaml"],
                          upload=True)
    assert status == "FAILED"
    assert "rlhf-ray job: error: runs_dir resolves to " in logs
    assert "inside this job's working directory" in logs
    assert "an uploaded working_dir is a temporary copy" in logs


def test_a_stage_asking_for_gpus_gets_the_gpu_node_type_and_refuses_its_missing_cuda(dashboard, tmp_path):
    status, logs = submit(dashboard, "gpu-stage", [
        "jobs/stage.py", "pretrain", "--config", "configs/test.yaml", "--set", f"runs_dir={tmp_path}",
        "--set", "pretrain.resources.use_gpu=true", "--set", "pretrain.resources.num_workers=1"])
    assert status == "FAILED"
    # The autoscaler added the node type that declares a GPU; its GPU exists only on paper.
    assert [n["resources_total"]["GPU"] for n in workers(dashboard) if "GPU" in n["resources_total"]] == [1]
    assert re.search(r"pretrain worker 0 was given GPU 0 by Ray on node \w+ \([\d.]+\), but that node "
                     r"has no usable CUDA device \(torch.cuda.is_available\(\) is False", logs), logs[-3000:]
    assert not (tmp_path / "test" / "base").exists()


def test_workers_larger_than_any_node_type_say_what_they_wait_for_and_give_up(dashboard, tmp_path):
    status, logs = submit(dashboard, "too-large", [
        "jobs/stage.py", "pretrain", "--config", "configs/test.yaml", "--set", f"runs_dir={tmp_path}",
        "--set", "pretrain.resources.cpus_per_worker=4", "--set", "pretrain.resources.placement_timeout_s=5"])
    assert status == "FAILED"
    assert "pretrain (2 workers) waiting 5s for {CPU 4} + {CPU 4}" in logs
    assert "no node can hold a bundle of {CPU 4}" in logs
    assert "gave up after 5s (the stage's placement_timeout_s)" in logs
    assert not (tmp_path / "test" / "base").exists()
