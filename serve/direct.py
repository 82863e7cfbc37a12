"""Where each chat stage answers without Serve's proxy in front: under Serve's direct ingress
(`cluster.serve_ingress: direct`, or a cluster whose `ray start` set
RAY_SERVE_ENABLE_DIRECT_INGRESS=1) every replica of a stage's app also serves HTTP on a port of
its own, which Serve allocates (30000-31000 by default) and changes when the replica is replaced.
Serve's controller publishes those addresses as its target groups (as it feeds a load balancer);
this module turns them into each stage's OpenAI base URLs, which `rlhf-ray serve` prints and the
router's `GET /v1/models` lists, so a client can always ask for the current ones."""

from __future__ import annotations

import asyncio

from ray.serve.schema import ServeInstanceDetails

from serve.deployment import stage_of_app

# A host the replicas bind to that means "every interface": the URL then names the node's IP.
ANY_INTERFACE = ("0.0.0.0", "::", "")


def stage_urls(details: ServeInstanceDetails) -> dict[str, list[str]]:
    """Each chat stage's base URLs at its replicas' own ports (sorted); a stage with none (direct
    ingress off, or no replica running yet, when Serve names its proxies instead) is left out."""
    proxy_port = details.http_options.port if details.http_options else None
    bound = details.http_options.host if details.http_options else ""
    urls: dict[str, list[str]] = {}
    for group in details.target_groups:
        stage = stage_of_app(group.app_name)
        if stage is None or group.protocol != "HTTP":
            continue
        found = sorted(f"http://{target.ip if bound in ANY_INTERFACE else bound}:{target.port}"
                       f"{group.route_prefix}/v1"
                       for target in group.targets if target.port != proxy_port)
        if found:
            urls[stage] = found
    return urls


def current_stage_urls() -> dict[str, list[str]]:
    """stage_urls of the Serve instance this process is connected to (a driver or a replica)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    return stage_urls(ServeInstanceDetails(**details))


async def published_stage_urls() -> dict[str, list[str]]:
    """current_stage_urls from an async handler, without blocking its event loop on the
    controller's answer."""
    return await asyncio.to_thread(current_stage_urls)
