"""serve: the deploy model as an HTTP service on ONNX Runtime, with dynamic micro-batching.

POST /predict takes one image (raw body, Content-Type image/*) or several (multipart/form-data, one part per
image) and answers, per image in order, the top-k classes with calibrated probabilities (softmax of the logits
over the model's temperature) and whether the model abstains:

    {"predictions": [{"filename": "a.jpg" | null, "top_k": [{"class": "ants", "probability": 0.97}, ...],
                      "abstained": false, "reason": null}, ...],
     "model": {"variant": ..., "sha256": ...}}

"abstained" is true, with "reason" "out_of_distribution" (energy score over the model's threshold: probably not
an image of any class) or "low_confidence" (top probability under the abstention threshold), when the answer
should not be trusted; top_k is given all the same, so clients that ignore the two fields see today's answers.
The temperature and thresholds come from the ONNX metadata (the deploy stage fits them; see stages/trust.py,
and GET /metadata's "trust"); a model without them never abstains. Abstentions are counted by reason in
/metrics (serve_abstentions_total). GET /healthz, /readyz, /metadata, /metrics.
With SERVE_API_KEY set in the environment, /predict needs the header X-API-Key (an empty key is refused at start
unless SERVE_API_KEY_DISABLED=1). The model is the one the model card names, and the service refuses to start if
the file's SHA-256 differs from the card's. serve/server.py runs it behind nginx.
"""
import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import os
import signal
import sys
import threading
import time
from urllib.parse import urlsplit

import numpy as np
import prometheus_client as prom
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve.batcher import Batcher
from serve.decode import Decoder
from serve.model import InputError, Model, Params, top_k
from serve.server import Server
from stages.config import UserError, cli, load_section
from stages.trust import REASONS

API_KEY_ENV = "SERVE_API_KEY"
NO_KEY_ENV = "SERVE_API_KEY_DISABLED"            # "1": an empty SERVE_API_KEY means no key, on purpose
# nginx's own refusals reach the app as /_error/{status} (serve/server.py): the same JSON, the same metrics
NGINX_ERRORS = {400: ("bad_request", "the request is not valid HTTP/1.1"),
                404: ("not_found", "no such endpoint"),
                408: ("request_timeout", "the request took too long to arrive"),
                413: ("body_too_large", "the body is over the limit of {max_body_bytes:,} bytes"),
                414: ("uri_too_long", "the request line is over the header limit of {max_header_bytes:,} bytes"),
                431: ("headers_too_large", "the headers are over the limit of {max_header_bytes:,} bytes"),
                500: ("internal", "internal error"),
                503: ("busy", "{max_connections} requests to /predict are in progress; retry shortly")}
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


CLOSE_AFTER = (401, 408, 413)          # the body may be unread: never reuse the connection it came on


def error(status, kind, detail):
    headers = {"connection": "close"} if status in CLOSE_AFTER else None
    return JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)


async def body_chunks(request, limit):
    """The body as it streams in; 413 as soon as it is known to pass `limit`, by Content-Length or by count."""
    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise InputError(400, "bad_request", "Content-Length is not a number")
    if length is not None and int(length) > limit:
        raise InputError(413, "body_too_large", f"the body is {int(length):,} bytes; the limit is {limit:,}")
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise InputError(413, "body_too_large", f"the body passed the limit of {limit:,} bytes")
            yield chunk
    except ClientDisconnect:
        raise InputError(400, "client_disconnected", "the client went away before sending the whole body") from None


async def read_images(request, p):
    """[(filename or None, bytes)] from a raw image body or a multipart body of one part per image."""
    media, options = parse_options_header(request.headers.get("content-type"))
    if media.startswith(b"image/"):
        data = bytearray()
        async for chunk in body_chunks(request, p.max_body_bytes):
            data += chunk
        return [(None, bytes(data))]
    if media != b"multipart/form-data":
        raise InputError(415, "unsupported_media_type", "send one image with Content-Type image/*, or "
                         "multipart/form-data with one part per image")
    if not options.get(b"boundary"):
        raise InputError(400, "malformed_multipart", "multipart/form-data without a boundary")
    return await read_parts(request, options[b"boundary"], p)


async def read_parts(request, boundary, p):
    parts, header, done = [], {}, []

    def begin():
        if len(parts) == p.max_images:
            raise InputError(413, "too_many_images", f"more than {p.max_images} images in one request")
        parts.append([None, bytearray()])
        header.clear()

    def header_end():
        name, value = bytes(header.pop("field", b"")).lower(), bytes(header.pop("value", b""))
        if name == b"content-disposition":
            filename = parse_options_header(value)[1].get(b"filename")
            parts[-1][0] = filename.decode("utf-8", "replace")[:255] if filename is not None else None

    callbacks = {
        "on_part_begin": begin,
        "on_header_field": lambda d, a, b: header.setdefault("field", bytearray()).extend(d[a:b]),
        "on_header_value": lambda d, a, b: header.setdefault("value", bytearray()).extend(d[a:b]),
        "on_header_end": header_end,
        "on_part_data": lambda d, a, b: parts[-1][1].extend(d[a:b]),
        "on_end": lambda: done.append(True),
    }
    refused = None
    try:
        parser = MultipartParser(boundary, callbacks)
        async for chunk in body_chunks(request, p.max_body_bytes):
            if refused is None:
                try:
                    parser.write(chunk)
                except InputError as e:     # read the rest (within max_body_bytes) first: an answer sent
                    refused = e             # mid-upload resets the upstream socket, and nginx says 502
    except (MultipartParseError, ValueError) as e:
        raise InputError(400, "malformed_multipart", f"the multipart body cannot be parsed: {e}") from None
    if refused is not None:
        raise refused
    if not done:
        raise InputError(400, "malformed_multipart", "the multipart body ends before its closing boundary")
    if not parts:
        raise InputError(400, "no_images", "the multipart body has no parts")
    return [(name, bytes(data)) for name, data in parts]


def create_app(card_path, p):
    """The service for the model `card_path` names; UserError, before any port opens, if it does not check out."""
    model = Model(card_path, p.threads)
    if model.cpu_warning:
        print(model.cpu_warning, file=sys.stderr, flush=True)
    model.warm(p.max_batch_size)
    metrics = Metrics(model)
    batcher = Batcher(model.infer, p.max_batch_size, p.max_wait_ms, metrics.on_batch)
    decoder = Decoder(model.transform, p)
    api_key = read_api_key()
    k = min(p.top_k, len(model.classes))
    info = {**model.info(), "top_k": k, "limits": {"max_images": p.max_images, "max_body_bytes": p.max_body_bytes,
                                                   "max_pixels": p.max_pixels,
                                                   "max_request_pixels": p.max_request_pixels}}
    served_by = {"variant": info["variant"], "sha256": info["version"]["sha256"]}

    async def classify(images):
        names = [name for name, _ in images]
        arrays = await decoder.run(images)
        del images
        logits = await asyncio.gather(*(batcher.submit(x) for x in arrays))
        metrics.images.inc(len(logits))
        probs, reasons = model.decide(np.stack(logits))
        for r in filter(None, reasons):
            metrics.abstentions.labels(r).inc()
        return JSONResponse({"predictions": [{"filename": n, "top_k": top_k(pr, model.classes, k),
                                              "abstained": r is not None, "reason": r}
                                             for n, pr, r in zip(names, probs, reasons)], "model": served_by})

    async def predict(request):
        # the raw header bytes against the key's UTF-8 bytes: one encoding on both sides
        given = next((v for name, v in request.scope["headers"] if name == b"x-api-key"), b"")
        if api_key and not hmac.compare_digest(given, api_key):
            raise InputError(401, "unauthorized", "missing or wrong X-API-Key header")
        if not batcher.running:
            raise InputError(503, "not_ready", "the model is not serving (starting or stopping)")
        try:
            async with asyncio.timeout(p.read_timeout_s):
                images = await read_images(request, p)
        except TimeoutError:
            raise InputError(408, "read_timeout", f"the body took over {p.read_timeout_s} s to arrive") from None
        work = asyncio.ensure_future(classify(images))
        gone = asyncio.ensure_future(disconnected(request))
        del images
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            gone.cancel()
            return work.result()
        work.cancel()                   # queued decodes and batch places are dropped
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        raise InputError(499, "client_gone", "the client closed the connection before the answer")

    async def healthz(request):         # liveness: a batcher that died never comes back
        if batcher.dead:
            return error(503, "batcher_dead", "the inference loop has stopped: restart the service")
        return JSONResponse({"status": "ok"})

    async def nginx_error(request):
        status = int(request.path_params["status"])
        kind, detail = NGINX_ERRORS.get(status, (f"http_{status}", "refused by the server"))
        metrics.errors.labels(kind).inc()
        return error(status, kind, detail.format(**dataclasses.asdict(p)))

    async def readyz(request):
        if not batcher.running:
            return error(503, "not_ready", "the model is not serving (starting or stopping)")
        return JSONResponse({"status": "ready"})

    async def metadata(request):
        return JSONResponse(info)

    async def metrics_endpoint(request):
        return Response(prom.generate_latest(metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    async def input_error(request, e):
        metrics.errors.labels(e.kind).inc()
        return error(e.status, e.kind, e.detail)

    async def http_error(request, e):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, f"http_{e.status_code}")
        metrics.errors.labels(kind).inc()
        return error(e.status_code, kind, e.detail)

    async def internal_error(request, e):           # logged with its traceback by uvicorn
        metrics.errors.labels("internal").inc()
        return error(500, "internal", "internal error")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:                                    # uvicorn has let in-flight requests finish by now
            await batcher.stop()
            decoder.shutdown()

    routes = [Route("/predict", predict, methods=["POST"]), Route("/healthz", healthz), Route("/readyz", readyz),
              Route("/metadata", metadata), Route("/metrics", metrics_endpoint),
              Route("/_error/{status:int}", nginx_error, methods=["GET", "HEAD", "POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(MetricsMiddleware, metrics=metrics)],
                    exception_handlers={InputError: input_error, HTTPException: http_error,
                                        Exception: internal_error})
    app.router.redirect_slashes = False             # its redirect's Location comes from the client's Host header
    app.state.batcher = batcher
    return app


def read_api_key():
    """SERVE_API_KEY as UTF-8 bytes; b"" (no key) when unset, or when empty and SERVE_API_KEY_DISABLED=1."""
    key = os.environ.get(API_KEY_ENV)
    if key is None:
        return b""
    if not key.strip() and os.environ.get(NO_KEY_ENV) != "1":
        raise UserError(f"{API_KEY_ENV} is set but empty: set a key, or unset it (or set {NO_KEY_ENV}=1) to "
                        "serve without one")
    return key.encode("utf-8")


async def disconnected(request):
    """Return once the client has gone (the body has been read: the next message can only be a disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def serve(card_path, p):
    """Run the service (nginx in front, see serve/server.py) until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with Server(create_app(card_path, p), p) as server:
        print(f"serving on http://{p.host}:{p.port} (nginx in front of uvicorn)", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            if not server.alive():
                raise UserError("nginx or uvicorn stopped unexpectedly (see the log above)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    card = os.environ.get("SERVE_CARD")
    ap.add_argument("--card", required=card is None, default=card,
                    help="the model card JSON the deploy stage wrote (default: $SERVE_CARD)")
    ap.add_argument("--host", help="overrides params.yaml serve.host (a container listens on 0.0.0.0)")
    ap.add_argument("--port", type=int, help="overrides params.yaml serve.port")
    args = ap.parse_args()
    p = load_section(Params, "serve")
    p = dataclasses.replace(p, **{k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    serve(args.card, p)


if __name__ == "__main__":
    cli(main)
