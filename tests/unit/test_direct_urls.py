"""Under Serve's direct ingress each chat stage's replicas answer at ports of their own, which
Serve's controller publishes as target groups; serve/direct.py turns them into the stage's OpenAI
base URLs (what `rlhf-ray serve` prints and the router's /v1/models lists)."""

from ray.serve.schema import ServeInstanceDetails

from serve.deployment import stage_of_app
from serve.direct import stage_urls


def details(host: str, groups: list[dict]) -> ServeInstanceDetails:
    """A Serve instance's details as its controller reports them (only what stage_urls reads)."""
    return ServeInstanceDetails(proxies={}, applications={},
                                http_options={"host": host, "port": 8000}, target_groups=groups)


def group(app: str, route: str, *targets: tuple[str, int], protocol: str = "HTTP") -> dict:
    return {"app_name": app, "route_prefix": route, "protocol": protocol,
            "targets": [{"ip": ip, "port": port, "instance_id": "", "name": f"replica-{port}"}
                        for ip, port in targets]}


def test_each_chat_stage_is_at_its_replicas_own_ports_with_its_route_prefix():
    published = details("127.0.0.1", [
        group("rlhf-ray", "/", ("10.0.0.5", 30000)),  # the router's app: reached at serve.port
        group("rlhf-ray-sft", "/sft", ("10.0.0.5", 30002), ("10.0.0.5", 30001)),
        group("rlhf-ray-base", "/base", ("10.0.0.5", 30003)),
        group("rlhf-ray-base", "/base", ("10.0.0.5", 40000), protocol="gRPC"),
        group("rlhf-ray-rank", "/rank", ("10.0.0.5", 30004)),  # the ranking page: no model
    ])
    assert stage_urls(published) == {  # bound to 127.0.0.1: that is where they answer
        "sft": ["http://127.0.0.1:30001/sft/v1", "http://127.0.0.1:30002/sft/v1"],
        "base": ["http://127.0.0.1:30003/base/v1"]}


def test_replicas_bound_to_every_interface_are_named_by_their_nodes_ip():
    published = details("0.0.0.0", [group("rlhf-ray-rlhf", "/rlhf", ("10.0.0.7", 30000),
                                          ("10.0.0.5", 30000))])
    assert stage_urls(published) == {"rlhf": ["http://10.0.0.5:30000/rlhf/v1",
                                              "http://10.0.0.7:30000/rlhf/v1"]}


def test_without_direct_ingress_or_before_a_replica_runs_serve_names_its_proxy_and_no_url_is_given():
    published = details("127.0.0.1", [
        group("", "/", ("10.0.0.5", 8000)),  # direct ingress off: the proxies alone
        group("rlhf-ray-sft", "/sft", ("10.0.0.5", 8000)),  # no replica running yet
    ])
    assert stage_urls(published) == {}


def test_only_a_chat_stages_own_app_names_a_stage():
    assert [stage_of_app(name) for name in ("rlhf-ray-sft", "rlhf-ray-base", "rlhf-ray-rlhf")] == [
        "sft", "base", "rlhf"]
    assert [stage_of_app(name) for name in ("rlhf-ray", "rlhf-ray-rank", "rlhf-ray-reward",
                                            "sft", "")] == [None] * 5
