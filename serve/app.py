"""serve: the deploy model as an HTTP service on ONNX Runtime, with dynamic micro-batching.

POST /predict takes one image (raw body, Content-Type image/*) or several (multipart/form-data, one part per
image) and answers, per image in order, the top-k classes with calibrated probabilities (softmax of the logits
over the model's temperature) and whether the model abstains:

    {"predictions": [{"filename": "a.jpg" | null, "top_k": [{"class": "ants", "probability": 0.97}, ...],
                      "abstained": false, "reason": null}, ...],
     "model": {"variant": ..., "sha256": ...}}

"abstained" is true, with "reason" "out_of_distribution" (the model's ood_score output, the distance to the
nearest train images' features, over its threshold: probably not an image of any class) or "low_confidence" (top probability under the abstention threshold), when the answer
should not be trusted; top_k is given all the same, so clients that ignore the two fields see today's answers.
The temperature and thresholds come from the ONNX metadata (the deploy stage fits them; see stages/trust.py,
and GET /metadata's "trust"); a model without them never abstains. Abstentions are counted by reason in
/metrics (serve_abstentions_total). GET /healthz, /readyz, /metadata, /metrics.
With SERVE_API_KEY set in the environment, /predict needs the header X-API-Key (an empty key is refused at start
unless SERVE_API_KEY_DISABLED=1). The model is the one the model card names, and the service refuses to start if
the file's SHA-256 differs from the card's. serve/server.py runs it behind nginx.
"""
import asyncio
import contextlib
import dataclasses
import hmac
import os
import signal
import sys
import threading

import numpy as np
import prometheus_client as prom
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve.batcher import Batcher
from serve.decode import Decoder
from serve.metrics import Metrics, MetricsMiddleware
from serve.model import InputError, Model, Params, top_k
from serve.server import Server
from serve.upload import read_images
from stages.config import UserError, cli, load_section, parser

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
CLOSE_AFTER = (401, 408, 413)          # the body may be unread: never reuse the connection it came on
# nginx streams a body to the app as it arrives (proxy_request_buffering off). An app that answers 401 and closes
# while nginx is still writing that body makes nginx's write fail, and the client gets nginx's 502 instead (the API
# key test saw it about 1 run in 3). The app reads what is on its way for this long first: a normal request's body
# is then consumed before the close; a body that dribbles or is huge still gets its 401 this soon.
UNAUTHORIZED_GRACE_S = 0.25


def error(status, kind, detail):
    headers = {"connection": "close"} if status in CLOSE_AFTER else None
    return JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)


class Service:
    """The endpoints over one model: its micro-batcher, decoder, metrics and API key."""

    def __init__(self, model, p):
        self.model, self.p = model, p
        self.metrics = Metrics(model)
        self.batcher = Batcher([r.run for r in model.runners], p.max_batch_size, p.max_wait_ms, self.metrics.on_batch)
        self.decoder = Decoder(model.transform, p)
        self.api_key = read_api_key()
        self.k = min(p.top_k, len(model.classes))
        self.info = {**model.info(), "top_k": self.k, "limits": {
            "max_images": p.max_images, "max_body_bytes": p.max_body_bytes, "max_pixels": p.max_pixels,
            "max_request_pixels": p.max_request_pixels}}
        self.served_by = {"variant": self.info["variant"], "sha256": self.info["version"]["sha256"]}

    async def classify(self, images):
        names = [name for name, _ in images]
        arrays = await self.decoder.run(images)
        del images
        rows = await asyncio.gather(*(self.batcher.submit(x) for x in arrays))
        self.metrics.images.inc(len(rows))
        probs, reasons = self.model.decide([np.stack(out) for out in zip(*rows)])
        for r in filter(None, reasons):
            self.metrics.abstentions.labels(r).inc()
        return JSONResponse({"predictions": [{"filename": n, "top_k": top_k(pr, self.model.classes, self.k),
                                              "abstained": r is not None, "reason": r}
                                             for n, pr, r in zip(names, probs, reasons)], "model": self.served_by})

    async def predict(self, request):
        # the raw header bytes against the key's UTF-8 bytes: one encoding on both sides
        given = next((v for name, v in request.scope["headers"] if name == b"x-api-key"), b"")
        if self.api_key and not hmac.compare_digest(given, self.api_key):
            await drain(request, UNAUTHORIZED_GRACE_S)
            raise InputError(401, "unauthorized", "missing or wrong X-API-Key header")
        if not self.batcher.running:
            raise InputError(503, "not_ready", "the model is not serving (starting or stopping)")
        try:
            async with asyncio.timeout(self.p.read_timeout_s):
                images = await read_images(request, self.p)
        except TimeoutError:
            raise InputError(408, "read_timeout",
                             f"the body took over {self.p.read_timeout_s} s to arrive") from None
        work = asyncio.ensure_future(self.classify(images))
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

    async def healthz(self, request):   # liveness: a batcher that died never comes back
        if self.batcher.dead:
            return error(503, "batcher_dead", "the inference loop has stopped: restart the service")
        return JSONResponse({"status": "ok"})

    async def nginx_error(self, request):
        status = int(request.path_params["status"])
        kind, detail = NGINX_ERRORS.get(status, (f"http_{status}", "refused by the server"))
        self.metrics.errors.labels(kind).inc()
        return error(status, kind, detail.format(**dataclasses.asdict(self.p)))

    async def readyz(self, request):
        if not self.batcher.running:
            return error(503, "not_ready", "the model is not serving (starting or stopping)")
        return JSONResponse({"status": "ready"})

    async def metadata(self, request):
        return JSONResponse(self.info)

    async def metrics_endpoint(self, request):
        return Response(prom.generate_latest(self.metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    async def input_error(self, request, e):
        self.metrics.errors.labels(e.kind).inc()
        return error(e.status, e.kind, e.detail)

    async def http_error(self, request, e):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, f"http_{e.status_code}")
        self.metrics.errors.labels(kind).inc()
        return error(e.status_code, kind, e.detail)

    async def internal_error(self, request, e):     # logged with its traceback by uvicorn
        self.metrics.errors.labels("internal").inc()
        return error(500, "internal", "internal error")

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        await self.batcher.start()
        try:
            yield
        finally:                                    # uvicorn has let in-flight requests finish by now
            await self.batcher.stop()
            self.decoder.shutdown()


def create_app(card_path, p):
    """The service for the model `card_path` names; UserError, before any port opens, if it does not check out."""
    model = Model(card_path, p.threads, p.lanes)
    if model.cpu_warning:
        print(model.cpu_warning, file=sys.stderr, flush=True)
    p = model.resolve(p)
    print(f"batching: up to {p.max_batch_size} images per call, {p.lanes} lane(s) x {p.threads} ONNX Runtime "
          f"thread(s), {p.decode_threads} decode thread(s): {model.policy_source}", file=sys.stderr, flush=True)
    model.warm(p.max_batch_size)
    s = Service(model, p)
    routes = [Route("/predict", s.predict, methods=["POST"]), Route("/healthz", s.healthz),
              Route("/readyz", s.readyz), Route("/metadata", s.metadata), Route("/metrics", s.metrics_endpoint),
              Route("/_error/{status:int}", s.nginx_error, methods=["GET", "HEAD", "POST"])]
    app = Starlette(routes=routes, lifespan=s.lifespan,
                    middleware=[Middleware(MetricsMiddleware, metrics=s.metrics)],
                    exception_handlers={InputError: s.input_error, HTTPException: s.http_error,
                                        Exception: s.internal_error})
    app.router.redirect_slashes = False             # its redirect's Location comes from the client's Host header
    app.state.batcher = s.batcher
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


async def drain(request, seconds):
    """Read and drop the request body for at most `seconds` (a client that leaves meanwhile ends it too)."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(seconds):
            async for _ in request.stream():
                pass


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
    ap = parser(__doc__)
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
