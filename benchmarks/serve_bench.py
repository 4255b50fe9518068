"""Benchmark the HTTP service against the in-process serving limit, in one run on one machine (prints, never
asserts).

The server runs in its own process (`serve.app.serve`) on the pipeline's model: the one outputs/deploy/card.json
names, or outputs/export/model.onnx, or else a tiny model built here. First the limit: decode + ONNX Runtime
images/s in process at batch sizes 1-32 and every split of the cores into lanes x threads
(`stages.throughput`); the server runs with the fastest. Clients send one real photo per request at
concurrency 1, 8 and 32 for a fixed time each. Client and server share this machine's cores.
Run from the project root: python -m benchmarks.serve_bench [--seconds 10]
"""
import argparse
import asyncio
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from stages.config import UserError

CARD, MODEL = Path("outputs/deploy/card.json"), Path("outputs/export/model.onnx")


def pick_model(tmp):
    """(ONNX path, variant, description): the model the deploy stage chose, export's, or a tiny one built here.
    `benchmarks.serving.run` writes the card the server checks."""
    if CARD.exists():
        card = json.loads(CARD.read_text())
        return card["model"], card["variant"], f"pipeline model ({CARD})"
    if MODEL.exists():
        return str(MODEL), "onnx_fp32", f"pipeline model ({MODEL}; no deploy card yet)"
    from stages import export, prepare, train
    from tests.conftest import COLORS, TINY, make_image
    for split, n in (("train", 10), ("val", 4)):
        for k, (c, color) in enumerate(COLORS.items()):
            for i in range(n):
                make_image(tmp / "img" / split / c / f"{i}.jpg", color, seed=1000 * (split == "val") + 100 * k + i)
    prepare.run(tmp / "img", tmp / "prepare", prepare.Params(source=str(tmp / "img")))
    train.run(tmp / "prepare/manifest.csv", tmp / "train", train.Params(**TINY))
    export.run(tmp / "train/model.pt", tmp / "prepare/manifest.csv", tmp / "export", export.Params())
    return str(tmp / "export/model.onnx"), "onnx_fp32", "tiny test model built here (no pipeline model found)"


def photo():
    """One real photo as JPEG bytes (a generated one if the data set is absent)."""
    files = sorted(Path("data/hymenoptera/val").glob("*/*.jpg"))
    if files:
        return files[0].read_bytes(), str(files[0])
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue(), "generated 320x240 JPEG"


async def post(reader, writer, head, data):
    """One HTTP/1.1 request on a kept-alive connection: (status code, whether the server closes the connection
    after it); the body is read and dropped."""
    writer.write(head + data)
    status = int((await reader.readline()).split()[1])
    length, close = None, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
    if length is None:
        raise RuntimeError("the server answered without a content-length")
    await reader.readexactly(length)
    return status, close


async def load(url, data, concurrency, seconds, on_start=lambda: None):
    """(requests, errors, latencies in s, elapsed s) for `concurrency` clients sending one image per request,
    after a second of warm-up; `on_start()` is called as the timed part begins.

    A bare asyncio HTTP/1.1 client, not httpx: the load generator shares the server's two cores here, and
    every millisecond of CPU it spends per request is one the server does not have.
    """
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST /predict HTTP/1.1\r\nhost: {host}\r\ncontent-type: image/jpeg\r\n"
            f"content-length: {len(data)}\r\n\r\n").encode()
    latencies, errors = [], [0]

    async def client(conn, stop):
        while time.perf_counter() < stop:
            t = time.perf_counter()
            status, close = await post(*conn, head, data)
            if close:               # nginx ends a connection after keepalive_requests (1000): open the next one
                conn[1].close()
                conn[:] = await asyncio.open_connection(host, int(port))
            errors[0] += status != 200
            latencies.append(time.perf_counter() - t)

    conns = [list(await asyncio.open_connection(host, int(port))) for _ in range(concurrency)]
    try:
        warm = time.perf_counter() + 1                                   # connections up, caches warm
        await asyncio.gather(*(client(c, warm) for c in conns))
        latencies.clear()
        on_start()
        start = time.perf_counter()
        await asyncio.gather(*(client(c, start + seconds) for c in conns))
        return len(latencies), errors[0], np.array(latencies), time.perf_counter() - start
    finally:
        for _, writer in conns:
            writer.close()


def batch_stats(url):
    text = httpx.get(url + "/metrics").text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    return samples["serve_batch_size_sum"], samples["serve_batch_size_count"]


def start_server(card, p, log):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = dataclasses.replace(p, host="127.0.0.1", port=port)
    code = ("import sys, json; from serve.app import serve; from serve.model import Params; "
            "serve(sys.argv[1], Params(**json.loads(sys.argv[2])))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(card), json.dumps(dataclasses.asdict(p))],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the server exited: {Path(log).read_text()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise UserError("the server did not become ready in 120 s")


def main():
    from benchmarks import serving                     # it builds on this module's functions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="measured time per concurrency level")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, variant, what = pick_model(Path(tmp))
        print(f"model: {what}")
        r = serving.run(model, variant, tmp, args.seconds, repeats=1)
    print(f"image: {r['image']} ({r['image_bytes']:,} bytes)\nserver params: {r['params']} (0: the sweep's best)\n")
    print(f"{'in process, decode + ORT':<30}{'img/s':>8}   (median of {r['limit']['rounds']} rounds x "
          f"{r['limit']['seconds']} s, {r['limit']['cores']} cores)")
    for s in r["limit"]["settings"]:
        print(f"  batch {s['batch']:>2}, {s['lanes']} lane(s) x {s['threads']} thread(s){s['img_s']:>9.1f}"
              + ("  <- the limit, the server's setting" if s == r["limit"]["best"] else ""))
    print(f"\n{'server':<18}{'img/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}{'errors':>8}{'requests':>10}"
          f"{'/ limit':>9}")
    for c, v in r["levels"].items():
        print(f"{f'concurrency {c}':<18}{v['img_s']['median']:>8.1f}{v['p50_ms']['median']:>9.1f}"
              f"{v['p99_ms']['median']:>9.1f}{v['mean_batch']['median']:>7.1f}{v['errors']:>8}{v['requests']:>10}"
              f"{v['vs_limit']['median']:>9.2f}")
    print("\n/ limit: against the limit's setting run in process just before and after each phase")
    print(f"\n{'CPU ms per request':<18}{'server':>8}{'nginx':>8}{'client':>8}{'total':>8}   in process: "
          f"{r['inprocess_cpu_ms']['median']:.2f} ms an image (decode + ORT, the limit's setting)")
    for c, v in r["levels"].items():
        ms = {k: v["cpu_ms"][k]["median"] for k in ("server", "nginx", "client")}
        print(f"{f'concurrency {c}':<18}" + "".join(f"{x:>8.2f}" for x in ms.values()) + f"{sum(ms.values()):>8.2f}")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
