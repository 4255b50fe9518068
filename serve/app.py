"""serve: the deploy model as an HTTP service on ONNX Runtime, with dynamic micro-batching.

POST /predict takes one image (raw body, Content-Type image/*) or several (multipart/form-data, one part per
image) and answers the top-k classes with softmax probabilities. GET /healthz, /readyz, /metadata, /metrics.
With SERVE_API_KEY set in the environment, /predict needs the header X-API-Key. The model is the one the model
card names, and the service refuses to start if the file's SHA-256 differs from the card's.
"""
import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import hmac
import os
import sys
import time

import prometheus_client as prom
import uvicorn
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve.batcher import Batcher
from serve.model import InputError, Model, Params, preprocess, softmax, top_k
from stages.config import UserError, cli, load_section

API_KEY_ENV = "SERVE_API_KEY"
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
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"      # bounded label values
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


def error(status, kind, detail):
    return JSONResponse({"error": kind, "detail": detail}, status_code=status)


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
    try:
        parser = MultipartParser(boundary, callbacks)
        async for chunk in body_chunks(request, p.max_body_bytes):
            parser.write(chunk)
    except (MultipartParseError, ValueError) as e:
        raise InputError(400, "malformed_multipart", f"the multipart body cannot be parsed: {e}") from None
    if not done:
        raise InputError(400, "malformed_multipart", "the multipart body ends before its closing boundary")
    if not parts:
        raise InputError(400, "no_images", "the multipart body has no parts")
    return [(name, bytes(data)) for name, data in parts]


def create_app(card_path, p):
    """The service for the model `card_path` names; UserError, before any port opens, if it does not check out."""
    model = Model(card_path, p.threads)
    metrics = Metrics(model)
    batcher = Batcher(model.infer, p.max_batch_size, p.max_wait_ms, metrics.on_batch)
    decode_pool = concurrent.futures.ThreadPoolExecutor(p.decode_threads, thread_name_prefix="decode")
    decode = functools.partial(preprocess, transform=model.transform, max_pixels=p.max_pixels)
    api_key = os.environ.get(API_KEY_ENV, "").encode()
    k = min(p.top_k, len(model.classes))
    info = {**model.info(), "top_k": k, "limits": {"max_images": p.max_images, "max_body_bytes": p.max_body_bytes,
                                                   "max_pixels": p.max_pixels}}
    served_by = {"variant": info["variant"], "sha256": info["version"]["sha256"]}

    async def prepare(index, name, data):
        try:
            return await asyncio.get_running_loop().run_in_executor(decode_pool, decode, data)
        except InputError as e:
            where = f"image {index}" + (f" ({name!r})" if name else "")
            raise InputError(e.status, e.kind, f"{where}: {e.detail}") from None

    async def predict(request):
        given = request.headers.get("x-api-key", "").encode("utf-8", "replace")
        if api_key and not hmac.compare_digest(given, api_key):
            raise InputError(401, "unauthorized", "missing or wrong X-API-Key header")
        if not batcher.running:
            raise InputError(503, "not_ready", "the model is not serving (starting or stopping)")
        try:
            async with asyncio.timeout(p.read_timeout_s):
                images = await read_images(request, p)
        except TimeoutError:
            raise InputError(408, "read_timeout", f"the body took over {p.read_timeout_s} s to arrive") from None
        names = [name for name, _ in images]
        arrays = await asyncio.gather(*(prepare(i, n, d) for i, (n, d) in enumerate(images)))
        del images
        logits = await asyncio.gather(*(batcher.submit(x) for x in arrays))
        metrics.images.inc(len(logits))
        return JSONResponse({"predictions": [{"filename": n, "top_k": top_k(softmax(row), model.classes, k)}
                                             for n, row in zip(names, logits)], "model": served_by})

    async def healthz(request):
        return JSONResponse({"status": "ok"})

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
            decode_pool.shutdown()

    routes = [Route("/predict", predict, methods=["POST"]), Route("/healthz", healthz), Route("/readyz", readyz),
              Route("/metadata", metadata), Route("/metrics", metrics_endpoint)]
    return Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(MetricsMiddleware, metrics=metrics)],
                     exception_handlers={InputError: input_error, HTTPException: http_error,
                                         Exception: internal_error})


def config(app, p, **options):
    """uvicorn's settings for `app`: the one place where the `serve` params become server behaviour. `options`
    are further uvicorn.Config arguments (the tests quieten the log)."""
    return uvicorn.Config(app, host=p.host, port=p.port, limit_concurrency=p.max_connections,
                          timeout_keep_alive=p.keep_alive_s, timeout_graceful_shutdown=10, server_header=False,
                          loop="uvloop", http="httptools", **options)


def serve(card_path, p):
    """Run the service until interrupted."""
    server = uvicorn.Server(config(create_app(card_path, p), p))
    server.run()
    if not server.started:                          # the lifespan failed; uvicorn has logged why
        sys.exit(3)


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
