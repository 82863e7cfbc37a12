"""cluster.yaml (Ray's cluster launcher on AWS) and deploy/ (KubeRay) describe the GPU cluster the
pipeline runs on: a head without GPUs, GPU workers scaling from zero, the project installed with its
GPU extra, shared storage at /mnt/shared.

Everything here is offline: cluster.yaml goes through the schema and the config preparation `ray up`
runs before it first calls AWS (and the autoscaler's own bin packing); the KubeRay manifests through
the CRD schemas of KubeRay v1.7.0 (tests/data/kuberay/) and the checks its operator makes on top.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import (
    _default_utilization_scorer,
    get_bin_pack_residual,
    get_nodes_for,
)
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv
from ray.serve.schema import ServeDeploySchema

from rlhf_ray.config import load_config
from rlhf_ray.plan import plan_run

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
DEPLOY = REPO / "deploy"
KUBERAY_SCHEMAS = REPO / "tests" / "data" / "kuberay"
GPU_CONFIG = "configs/gpu-qwen.yaml"
# The job entry points and runtime_env (jobs/ is written alongside; only these names are relied on).
PIPELINE_ENTRYPOINT = f"python jobs/pipeline.py --config {GPU_CONFIG}"
RUNTIME_ENV = "jobs/runtime_env.yaml"
SHARED = "/mnt/shared"

# (vCPUs, GPUs) of the EC2 types used, to check the resources declared for them (the launcher
# would otherwise ask the EC2 API).
EC2_TYPES = {"m5.2xlarge": (8, 0), "g5.12xlarge": (48, 4), "p4d.24xlarge": (96, 8)}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def gpu_config() -> dict:
    """configs/gpu-qwen.yaml as written (plain YAML: the fields used here are name, runs_dir,
    the stages' resources and serve.api_key_env)."""
    return load_yaml(REPO / GPU_CONFIG)


def pinned_ray_version(pyproject: dict) -> str:
    [pin] = [d for d in pyproject["project"]["dependencies"] if re.match(r"ray\[[^\]]*\]==", d)]
    return pin.split("==")[1]


# --- cluster.yaml: the Ray cluster launcher -----------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load_yaml(CLUSTER_YAML)


@pytest.fixture(scope="module")
def prepared(cluster: dict) -> dict:
    """What `ray up` makes of cluster.yaml before its first AWS call (commands._bootstrap_config):
    merged with ray/autoscaler/aws/defaults.yaml, setup commands merged, per-type worker bounds
    filled in, then validated. The AWS steps that follow (resource lookup, IAM role, key pair,
    subnets, security groups) are not run."""
    config = prepare_config(copy.deepcopy(cluster))
    validate_config(config)
    return config


def head_and_workers(config: dict) -> tuple[dict, dict[str, dict]]:
    types = config["available_node_types"]
    head = config["head_node_type"]
    return types[head], {name: t for name, t in types.items() if name != head}


def ray_schema() -> dict:
    """The cluster-config JSON schema shipped with the installed ray (what `ray up` checks)."""
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def header_words(path: Path) -> str:
    """The comment block above `cluster_name:`, as one line of words (continuations joined)."""
    header = path.read_text().split("\ncluster_name:")[0]
    return " ".join(header.replace("#", " ").replace("\\\n", " ").split())


def test_cluster_yaml_validates_against_the_schema_shipped_with_ray(cluster):
    jsonschema.validate(cluster, ray_schema())


def test_ray_up_prepares_and_validates_it_offline(prepared, cluster):
    head, _ = head_and_workers(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert head["max_workers"] == 0  # filled in by prepare_config
    # Every node type declares its resources, so `ray up` never needs the EC2 API to infer them
    # (fillout_available_node_types_resources) and the autoscaler plans with these numbers.
    for name, node_type in prepared["available_node_types"].items():
        assert {"CPU", "GPU"} <= set(node_type["resources"]), name
        instance = node_type["node_config"]["InstanceType"]
        if instance in EC2_TYPES:
            declared = (node_type["resources"]["CPU"], node_type["resources"]["GPU"])
            assert declared == EC2_TYPES[instance], (name, instance)  # (vCPUs, GPUs)
    # One image (the DLAMI) for every node type.
    assert len({t["node_config"]["ImageId"] for t in prepared["available_node_types"].values()}) == 1
    # The common setup runs first on the head and on every worker.
    common = cluster["setup_commands"]
    assert prepared["head_setup_commands"][: len(common)] == common
    assert prepared["worker_setup_commands"][: len(common)] == common


def test_the_head_has_no_gpus(prepared):
    head, _ = head_and_workers(prepared)
    assert head["resources"]["GPU"] == 0 and head["resources"]["CPU"] > 0
    assert EC2_TYPES.get(head["node_config"]["InstanceType"], (0, 0))[1] == 0
    start = " ".join(prepared["head_start_ray_commands"])
    assert "ray start --head" in start and "--num-gpus=0" in start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start  # runs the autoscaler
    assert "--dashboard-host=0.0.0.0" in start  # the job server, reached through `ray dashboard`
    assert "$RAY_HEAD_IP:6379" in " ".join(prepared["worker_start_ray_commands"])


def test_gpu_workers_scale_from_zero_and_declare_their_gpus(prepared):
    _, workers = head_and_workers(prepared)
    assert workers, "no worker node types"
    for name, worker in workers.items():
        assert worker["min_workers"] == 0, f"{name} keeps GPU nodes up while idle"
        assert worker["resources"]["GPU"] >= 1 and worker["resources"]["CPU"] >= 1, name
        assert 1 <= worker["max_workers"] <= prepared["max_workers"], name


def test_idle_gpu_nodes_are_terminated(cluster):
    assert cluster["idle_timeout_minutes"] > 0
    assert cluster["provider"]["cache_stopped_nodes"] is False  # terminated, not stopped


def test_every_node_installs_the_project_with_the_gpu_extra(cluster, pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    installs = [re.search(r"pip install .*-e \"?'?\.\[([\w,-]+)\]", c) for c in cluster["setup_commands"]]
    installed = [m.group(1) for m in installs if m]
    assert installed == ["gpu"], installed
    assert "gpu" in extras and any(d.startswith("vllm==") for d in extras["gpu"])
    setup = "\n".join(cluster["setup_commands"])
    assert "git clone" in setup and "~/rlhf-ray" in setup
    # Installed into the environment `ray start` runs from (activated in ~/.bashrc).
    assert "source ~/venv/bin/activate" in setup and "--python ~/venv/bin/python" in setup


def test_every_command_the_launcher_runs_is_valid_bash(prepared):
    """The launcher runs each command in `bash --login -c -i`: parse them (bash -n runs nothing)."""
    keys = ["initialization_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    for command in {c for key in keys for c in prepared[key]}:
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command}\n{result.stderr}"


def test_every_node_mounts_the_shared_storage_the_gpu_config_writes_to(cluster, gpu_config):
    assert str(gpu_config["runs_dir"]).startswith(SHARED + "/")
    assert gpu_config["model"]["pretrained"].startswith(SHARED + "/")
    mounts = [c for c in cluster["setup_commands"] if re.search(rf"mount -t \S+ .* {SHARED}\b", c)]
    assert len(mounts) == 1, "no (or more than one) mount of the shared storage"
    assert f"mountpoint -q {SHARED}" in mounts[0]  # safe to run again on `ray up`


def stage_bundles(gpu_config: dict, stage: str) -> list[dict[str, float]]:
    """The Ray Train placement group of a stage: one bundle per worker."""
    res = gpu_config[stage]["resources"]
    bundle = {"CPU": res.get("cpus_per_worker", 1)}
    if res.get("use_gpu"):
        bundle["GPU"] = res.get("gpus_per_worker", 1)
    return [bundle] * res["num_workers"]


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_the_autoscaler_launches_gpu_workers_for_a_stage_of_the_gpu_config(prepared, gpu_config, stage):
    """The autoscaler's own bin packing (resource_demand_scheduler), from the head alone."""
    head, workers = head_and_workers(prepared)
    demand = stage_bundles(gpu_config, stage)
    assert all(b.get("GPU") for b in demand), f"{stage} of {GPU_CONFIG} does not use GPUs"
    left_after_head, _ = get_bin_pack_residual([dict(head["resources"])], demand)
    assert left_after_head == demand  # nothing of it fits on the GPU-less head
    scorer = functools.partial(_default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    to_launch, unfulfilled = get_nodes_for(
        prepared["available_node_types"], {prepared["head_node_type"]: 1}, prepared["head_node_type"],
        prepared["max_workers"], left_after_head, utilization_scorer=scorer)
    assert unfulfilled == [], f"the cluster cannot fit {stage}: {unfulfilled}"
    assert to_launch and set(to_launch) <= set(workers)
    assert sum(n * workers[t]["resources"]["GPU"] for t, n in to_launch.items()) >= len(demand)


def test_the_header_says_how_to_start_use_and_stop_it():
    header = header_words(CLUSTER_YAML)
    for text in ["ray up cluster.yaml", "ray job submit", f"--runtime-env {RUNTIME_ENV}",
                 PIPELINE_ENTRYPOINT, "ray down cluster.yaml"]:
        assert text in header, text
    assert (REPO / GPU_CONFIG).is_file()


# --- cluster-local.yaml: the autoscaler on this machine (Ray's fake multi-node provider) ---------

LOCAL_YAML = REPO / "cluster-local.yaml"


def test_the_local_cluster_validates_and_its_head_takes_no_work():
    local = load_yaml(LOCAL_YAML)
    jsonschema.validate(local, ray_schema())
    assert local["provider"]["type"] == "fake_multinode"
    head, workers = head_and_workers(local)
    assert head["resources"]["CPU"] == 0 and head["max_workers"] == 0
    assert workers and all(t["min_workers"] == 0 for t in workers.values())  # grows from nothing
    assert any(t["resources"].get("GPU") for t in workers.values())


def test_the_local_cluster_needs_two_nodes_at_once_for_the_test_configs_ppo():
    """PPO's roles are one placement group: the autoscaler sees all of it and adds two nodes."""
    local = load_yaml(LOCAL_YAML)
    cpu_node = local["available_node_types"]["cpu"]["resources"]["CPU"]
    [ppo] = [stage for stage in plan_run(load_config(REPO / "configs" / "test.yaml")).stages
             if stage.name == "ppo"]
    assert ppo.cpus == 2 * cpu_node


def test_the_local_clusters_header_says_how_to_start_use_and_stop_it():
    header = header_words(LOCAL_YAML)
    for text in ["export RAY_AUTH_MODE=token; ray get-auth-token --generate",
                 "RAY_FAKE_CLUSTER=1 ray start --head", "--num-cpus=0",
                 "--autoscaling-config=cluster-local.yaml", "ray job submit",
                 f"--runtime-env {RUNTIME_ENV} --working-dir local://$PWD", "ray stop"]:
        assert text in header, text


# --- deploy/: KubeRay ---------------------------------------------------------------------------

MANIFESTS = {"RayCluster": "raycluster.yaml", "RayJob": "rayjob.yaml", "RayService": "rayservice.yaml"}
CRDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    found = {}
    for kind, name in MANIFESTS.items():
        docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]
        assert [d["kind"] for d in docs] == [kind], name
        found[kind] = docs[0]
    return found


def closed(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others: the API server
    prunes unknown fields, and kubectl's (default) strict field validation rejects them."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: ({n: closed(s) for n, s in v.items()} if k in ("properties", "patternProperties")
               else closed(v)) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    """KubeRay v1.7.0's openAPIV3Schema of the kind (tests/data/kuberay/README.md). OpenAPI v3.0
    schemas are JSON Schema Draft 4 plus `x-kubernetes-*` extensions, which jsonschema ignores
    (int-or-string fields are spelt anyOf integer/string, which it checks)."""
    data = gzip.decompress((KUBERAY_SCHEMAS / f"ray.io_{CRDS[kind]}.v1.json.gz").read_bytes())
    return jsonschema.Draft4Validator(closed(json.loads(data)))


def schema_errors(kind: str, doc: dict) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in crd_validator(kind).iter_errors(doc))


@pytest.mark.parametrize("kind", MANIFESTS)
def test_manifest_validates_against_the_kuberay_crd_schema(manifests, kind):
    doc = manifests[kind]
    assert doc["apiVersion"] == "ray.io/v1"
    assert schema_errors(kind, doc) == []


def test_the_crd_schema_check_rejects_misspelt_and_mistyped_fields(manifests):
    bad = copy.deepcopy(manifests["RayCluster"])
    bad["spec"]["workerGroupSpecs"][0]["minReplica"] = 0                  # unknown field
    bad["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "4"               # int32 expected
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0        # map of strings
    del bad["spec"]["headGroupSpec"]["template"]                          # required
    errors = schema_errors("RayCluster", bad)
    assert len(errors) == 4, errors


def cluster_specs(manifests: dict) -> Iterator[tuple[str, dict]]:
    yield "RayCluster", manifests["RayCluster"]["spec"]
    yield "RayJob", manifests["RayJob"]["spec"]["rayClusterSpec"]
    yield "RayService", manifests["RayService"]["spec"]["rayClusterConfig"]


def pod_templates(spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]


def test_the_manifests_pass_the_kuberay_operators_own_checks(manifests):
    """What KubeRay v1.7.0 checks beyond the schema (ray-operator/controllers/ray/utils/validation.go:
    ValidateRayClusterMetadata/Spec, ValidateRayJobMetadata/Spec, ValidateRayServiceMetadata/Spec),
    for the fields these manifests use."""
    dns1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    max_name = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
    for kind, doc in manifests.items():
        name = doc["metadata"]["name"]
        assert dns1035.match(name) and len(name) <= max_name[kind], name
    for kind, spec in cluster_specs(manifests):
        options = spec.get("autoscalerOptions") or {}
        autoscaler_v2 = spec.get("enableInTreeAutoscaling") and options.get("version") == "v2"
        assert options.get("idleTimeoutSeconds", 0) >= 0
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            start = group.get("rayStartParams", {})
            sets_resources = any(start.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources"))
            assert not (sets_resources and group.get("resources")), kind  # one place for resources
            assert "labels" not in start, kind
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["maxReplicas"], (kind, group["groupName"])
        for where, template in pod_templates(spec):
            assert template["spec"]["containers"], (kind, where)
            if autoscaler_v2:
                assert template["spec"].get("restartPolicy", "Never") == "Never", (kind, where)
        assert len({g["groupName"] for g in spec["workerGroupSpecs"]}) == len(spec["workerGroupSpecs"])
    job = manifests["RayJob"]["spec"]
    assert job.get("rayClusterSpec") or job.get("clusterSelector")
    assert job.get("shutdownAfterJobFinishes") or not job.get("ttlSecondsAfterFinished")
    assert isinstance(yaml.safe_load(job.get("runtimeEnvYAML", "")) or {}, dict)


def ray_container(template: dict) -> dict:
    return template["spec"]["containers"][0]  # KubeRay's RayContainerIndex


def gpus(container: dict) -> tuple[int, int]:
    res = container.get("resources", {})
    return (int(res.get("requests", {}).get("nvidia.com/gpu", 0)),
            int(res.get("limits", {}).get("nvidia.com/gpu", 0)))


def test_the_head_pod_has_no_gpus_and_gpu_workers_scale_from_zero(manifests):
    for kind, spec in cluster_specs(manifests):
        assert spec["enableInTreeAutoscaling"] is True, kind
        assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0, kind
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0", kind
        assert gpus(ray_container(head["template"])) == (0, 0), kind
        assert spec["workerGroupSpecs"], kind
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0, (kind, group["groupName"])
            assert group["maxReplicas"] >= 1, (kind, group["groupName"])
            requested, limit = gpus(ray_container(group["template"]))
            # Kubernetes wants extended resources' requests equal to their limits.
            assert requested == limit >= 1, (kind, group["groupName"])


def test_every_ray_pod_mounts_the_shared_claim_at_mnt_shared(manifests):
    [pvc] = [d for d in yaml.safe_load_all((DEPLOY / "shared-pvc.yaml").read_text()) if d]
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    for kind, spec in cluster_specs(manifests):
        for where, template in pod_templates(spec):
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                      for v in template["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
            mounts = {m["mountPath"]: m["name"] for m in ray_container(template).get("volumeMounts", [])}
            assert claims.get(mounts.get(SHARED)) == pvc["metadata"]["name"], (kind, where)


def test_every_ray_container_runs_the_project_image_with_the_pinned_ray(manifests, pyproject):
    version = pinned_ray_version(pyproject)
    assert version == ray.__version__
    images = set()
    for kind, spec in cluster_specs(manifests):
        assert spec["rayVersion"] == version, kind
        images |= {ray_container(t)["image"] for _, t in pod_templates(spec)}
    assert len(images) == 1, images
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    [base] = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert base.startswith(f"rayproject/ray:{version}-") and base.endswith("-gpu"), base
    assert re.search(r"pip install .*-e \"\.\[gpu\]\"", dockerfile)
    assert "gpu" in pyproject["project"]["optional-dependencies"]


def dockerfile_workdir() -> str:
    return re.findall(r"^WORKDIR (\S+)", (DEPLOY / "Dockerfile").read_text(), re.M)[-1]


def test_the_rayjob_runs_the_pipeline_on_the_rayclusters_spec(manifests):
    job = manifests["RayJob"]["spec"]
    assert job["entrypoint"] == PIPELINE_ENTRYPOINT
    assert (REPO / GPU_CONFIG).is_file()
    assert job["rayClusterSpec"] == manifests["RayCluster"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True  # its GPUs go back when the job ends
    env = yaml.safe_load(job["runtimeEnvYAML"])
    # The repository inside the image is the working_dir the entrypoint's paths are relative to;
    # Ray's own runtime_env validation, with this checkout standing in for the image's copy.
    assert env["working_dir"] == dockerfile_workdir()
    RuntimeEnv(**{**env, "working_dir": str(REPO)})
    runtime_env = REPO / RUNTIME_ENV
    if runtime_env.is_file():  # jobs/ is written alongside: its env_vars must reach the RayJob too
        wanted = (load_yaml(runtime_env) or {}).get("env_vars", {})
        assert wanted.items() <= env.get("env_vars", {}).items()


def test_the_rayservice_serves_the_run_the_gpu_config_writes(manifests, gpu_config):
    service = manifests["RayService"]["spec"]
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["serveConfigV2"]))
    app, *stage_apps, rank = config.applications
    # Its apps' names and import paths: tests/unit/test_serve_config.py.
    run = f"{gpu_config['runs_dir']}/{gpu_config['name']}"
    assert app.args == {"run": run}
    assert stage_apps and all(a.args["run"] == run for a in stage_apps)
    assert rank.args == {"folder": f"{run}/compare"}
    # Reachable from the Service: on all interfaces, on the port the head exposes as `serve`.
    assert config.http_options.host == "0.0.0.0"
    head = ray_container(service["rayClusterConfig"]["headGroupSpec"]["template"])
    assert {"containerPort": config.http_options.port, "name": "serve"} in head["ports"]


def test_the_api_key_the_app_requires_reaches_every_serving_container(manifests, gpu_config):
    key_env = gpu_config["serve"].get("api_key_env")
    if not key_env:
        pytest.skip(f"{GPU_CONFIG} serves without an API key")
    for where, template in pod_templates(manifests["RayService"]["spec"]["rayClusterConfig"]):
        env = {e["name"]: e for e in ray_container(template).get("env", [])}
        assert "secretKeyRef" in env[key_env]["valueFrom"], where
