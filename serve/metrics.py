"""The service's Prometheus metrics (a registry per app) and the middleware that counts and times every request."""
import time
from urllib.parse import urlsplit

import prometheus_client as prom

from stages.trust import REASONS

ENDPOINTS = ("/predict", "/healthz", "/readyz", "/metadata", "/metrics")


class Metrics:
    """Prometheus metrics in a registry of their own, so that several apps can live in one process."""

    def __init__(self, model):
        self.registry = r = prom.CollectorRegistry()
        self.requests = prom.Counter("serve_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = prom.Histogram("serve_request_seconds", "HTTP request latency", ["endpoint"], registry=r)
        self.batch = prom.Histogram("serve_batch_size", "images per ONNX Runtime call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.infer = prom.Histogram("serve_inference_seconds", "ONNX Runtime call latency", registry=r)
        self.images = prom.Counter("serve_images", "images classified", registry=r)
        self.errors = prom.Counter("serve_errors", "failed requests by kind", ["kind"], registry=r)
        self.abstentions = prom.Counter("serve_abstentions", "images answered with abstained: true, by reason",
                                        ["reason"], registry=r)
        for reason in REASONS:                  # at 0 from the start: a rate needs the series to exist
            self.abstentions.labels(reason)
        info = prom.Info("serve_model", "the model being served", registry=r)
        info.info({"variant": str(model.card["variant"]), "sha256": model.card["sha256"],
                   "git_rev": str(model.card.get("git_rev", "")), "dvc_md5": str(model.card.get("dvc_md5", ""))})

    def on_batch(self, size, seconds):
        self.batch.observe(size)
        self.infer.observe(seconds)


class MetricsMiddleware:
    """Counts every HTTP request by endpoint and status, and times it."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.startswith("/_error/"):                                          # nginx's: label its request
            path = urlsplit(dict(scope["headers"]).get(b"x-original-uri", b"").decode("latin-1")).path
        endpoint = path if path in ENDPOINTS else "other"                        # bounded label values
        status, start = 500, time.perf_counter()                                 # 500 unless a response starts

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
