"""Which processes leave the vLLM workers' cores to them (serve/cpus.py), and which HTTP ingress
Serve starts with (rlhf_ray/cluster.py)."""

import os

import pytest

from serve.cpus import all_node_cores, keep_off_worker_cores, to_move


def test_serves_processes_and_the_engines_schedulers_move_but_workers_and_other_actors_stay():
    node = [(1, "ray::ServeController"), (2, "ray::ProxyActor"),
            (3, "ray::ServeReplica:rlhf-ray:Router"), (4, "ray::ServeReplica:rlhf-ray-sft:stage-sft"),
            (5, "VLLM::EngineCore"), (6, "VLLM::Worker"), (7, "VLLM::Worker_TP0"),
            (8, "ray::PolicyWorker.train"), (9, "ray::IDLE"), (10, "ray::DashboardAgent"),
            (11, "ray::RuntimeEnvAgent"), (12, "python"),
            (13, "ray::ServeReplica:rlhf-ray:reward"), (14, "ray::ServeReplica:rlhf-ray:reward.score"),
            (15, "ray::ServeReplica:rlhf-ray:Router.handle_request"),
            (16, "ray::HAProxyManager"), (17, "haproxy")]  # Serve's HAProxy ingress
    assert to_move(node) == [1, 2, 3, 4, 5, 10, 11, 15, 16, 17]  # the reward model computes on its cores


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_an_engine_starts_on_every_core_and_the_thread_gets_its_cores_back():
    every = os.sched_getaffinity(0)
    one = {min(every)}
    os.sched_setaffinity(0, one)
    try:
        with all_node_cores():
            assert os.sched_getaffinity(0) == every  # pytest's parent lets it use them all
        assert os.sched_getaffinity(0) == one
    finally:
        os.sched_setaffinity(0, every)


def test_nothing_moves_without_bound_workers_or_without_a_core_left_over():
    assert keep_off_worker_cores(set()) == 0
    assert keep_off_worker_cores(set(os.sched_getaffinity(os.getppid()))) == 0


def test_the_serve_ingress_is_chosen_by_the_environment_the_local_ray_starts_with(monkeypatch):
    from rlhf_ray.cluster import ResourcesError, serve_ingress_env

    assert serve_ingress_env("proxy") == {"RAY_SERVE_ENABLE_HA_PROXY": "0",
                                          "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    assert serve_ingress_env("direct") == {"RAY_SERVE_ENABLE_HA_PROXY": "0",
                                           "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
    assert serve_ingress_env("haproxy") == {"RAY_SERVE_ENABLE_HA_PROXY": "1",  # ray[serve] ships it
                                            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # as on macOS
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    with pytest.raises(ResourcesError, match="cluster.serve_ingress=haproxy: Ray's HAProxy is not installed"):
        serve_ingress_env("haproxy")
