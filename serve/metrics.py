"""The ingress's Prometheus metrics, served at GET /metrics.

Every request passes through the ingress, so it counts them all: requests by route and HTTP
code, and per model the requests in flight (queued in Serve or running in an engine), time to
first token, whole-request time, tokens in and out, and each request's output tokens per second.
The figures are the ingress replica's own (the app runs one); Ray's metrics export has Serve's
and vLLM's figures per replica (docs/serving.md).
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http = Counter("rlhf_ray_http_requests", "HTTP requests answered, by route and code",
                            ["route", "code"], registry=r)
        self.in_flight = Gauge("rlhf_ray_requests_in_flight", "Generation requests accepted and "
                               "not yet finished (queued or running)", ["model"], registry=r)
        self.ttft = Histogram("rlhf_ray_time_to_first_token_seconds", "From the request's "
                              "arrival to its first text", ["model"], buckets=LATENCY_BUCKETS,
                              registry=r)
        self.duration = Histogram("rlhf_ray_request_duration_seconds", "From the request's arrival "
                                  "to its last token", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("rlhf_ray_prompt_tokens", "Prompt tokens of finished "
                                     "requests", ["model"], registry=r)
        self.generation_tokens = Counter("rlhf_ray_generation_tokens", "Tokens generated",
                                         ["model"], registry=r)
        self.tokens_per_second = Histogram("rlhf_ray_request_tokens_per_second", "A request's "
                                           "output tokens per second after its first",
                                           ["model"], buckets=RATE_BUCKETS, registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """One generation request's figures, recorded as it goes."""

    def __init__(self, metrics: ServeMetrics, model: str) -> None:
        self.metrics, self.model = metrics, model
        self.start = time.monotonic()
        self.first: float | None = None
        metrics.in_flight.labels(model).inc()

    def text(self) -> None:
        """Text went out (the first call marks the time to first token)."""
        if self.first is None:
            self.first = time.monotonic()
            self.metrics.ttft.labels(self.model).observe(self.first - self.start)

    def end(self, prompt_tokens: int, generated: int) -> None:
        m, end = self.metrics, time.monotonic()
        m.in_flight.labels(self.model).dec()
        m.duration.labels(self.model).observe(end - self.start)
        m.prompt_tokens.labels(self.model).inc(prompt_tokens)
        m.generation_tokens.labels(self.model).inc(generated)
        if self.first is not None and generated > 1 and end > self.first:
            m.tokens_per_second.labels(self.model).observe((generated - 1) / (end - self.first))

    def abandon(self) -> None:
        """The request ended without finishing (refused, or its client went away)."""
        self.metrics.in_flight.labels(self.model).dec()


# This process's figures (one process per ingress replica). Read it as `serve.metrics.METRICS`:
# Serve pickles the ingress class by value, and a copy of this object pickled with it would
# count apart from the one the middleware counts in.
METRICS = ServeMetrics()
