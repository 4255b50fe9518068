"""Benchmark the HTTP service against ONNX Runtime in-process, in one run on one machine (prints, never asserts).

The server runs in its own process (`serve.app.serve`) on the pipeline's model: outputs/export/card.json, or a
card written here for outputs/export/model.onnx, or else a tiny model built here. Clients send one real photo
per request at concurrency 1, 8 and 32 for a fixed time each; in-process ORT runs batches of 32 of the same
preprocessed photo with the same thread budget. Client and server share this machine's cores.
Run from the project root: python -m benchmarks.serve_bench [--seconds 10]
"""
import argparse
import asyncio
import dataclasses
import hashlib
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

from serve.model import Model, Params, preprocess, torch_threads
from stages.config import UserError, load_section

CARD, MODEL = Path("outputs/export/card.json"), Path("outputs/export/model.onnx")


def pick_card(tmp):
    """(card path, description): the pipeline's card, a card for the pipeline's model, or a tiny model's."""
    if CARD.exists():
        return CARD, f"pipeline model ({CARD})"
    if MODEL.exists():
        card = {"model": str(MODEL), "sha256": hashlib.sha256(MODEL.read_bytes()).hexdigest(),
                "variant": "onnx_fp32", "git_rev": "bench"}
        (tmp / "card.json").write_text(json.dumps(card))
        return tmp / "card.json", f"pipeline model ({MODEL}; no card yet, one written for the run)"
    from stages import export, prepare, train
    from tests.conftest import COLORS, TINY, make_image
    for split, n in (("train", 10), ("val", 4)):
        for k, (c, color) in enumerate(COLORS.items()):
            for i in range(n):
                make_image(tmp / "img" / split / c / f"{i}.jpg", color, seed=1000 * (split == "val") + 100 * k + i)
    prepare.run(tmp / "img", tmp / "prepare", prepare.Params(source=str(tmp / "img")))
    train.run(tmp / "prepare/manifest.csv", tmp / "train", train.Params(**TINY))
    export.run(tmp / "train/model.pt", tmp / "prepare/manifest.csv", tmp / "export", export.Params())
    onnx = tmp / "export/model.onnx"
    card = {"model": str(onnx), "sha256": hashlib.sha256(onnx.read_bytes()).hexdigest(), "variant": "onnx_fp32"}
    (tmp / "card.json").write_text(json.dumps(card))
    return tmp / "card.json", "tiny test model built here (no pipeline model found)"


def photo():
    """One real photo as JPEG bytes (a generated one if the data set is absent)."""
    files = sorted(Path("data/hymenoptera/val").glob("*/*.jpg"))
    if files:
        return files[0].read_bytes(), str(files[0])
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue(), "generated 320x240 JPEG"


def rate(step, seconds):
    """Calls of `step` per second over `seconds`, after one warm-up call."""
    step()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    return n / (time.perf_counter() - start)


def in_process(model, p, data, seconds):
    """{name: images/s} of ORT alone at batch 32, of one image end to end, and of preprocessing alone."""
    with torch_threads(1):
        x = preprocess(data, model.transform, p.max_pixels)
        batch = np.stack([x] * 32)
        return {"ort32": 32 * rate(lambda: model.infer(batch), seconds),
                "e2e1": rate(lambda: model.infer(preprocess(data, model.transform, p.max_pixels)[None]), seconds / 2),
                "prep": rate(lambda: preprocess(data, model.transform, p.max_pixels), seconds / 2)}


async def load(url, data, concurrency, seconds):
    """(requests, errors, latencies in s, elapsed s) for `concurrency` clients sending one image per request."""
    latencies, errors = [], [0]

    async def client(c, stop):
        while time.perf_counter() < stop:
            t = time.perf_counter()
            r = await c.post("/predict", content=data, headers={"content-type": "image/jpeg"})
            if r.status_code != 200:
                errors[0] += 1
            latencies.append(time.perf_counter() - t)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as c:
        warm = time.perf_counter() + 1                                   # connections up, caches warm
        await asyncio.gather(*(client(c, warm) for _ in range(concurrency)))
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(client(c, start + seconds) for _ in range(concurrency)))
        return len(latencies), errors[0], np.array(latencies), time.perf_counter() - start


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="measured time per concurrency level")
    args = ap.parse_args()
    try:
        p = load_section(Params, "serve")
    except UserError as e:
        p = Params()
        print(f"note: {e}; using the serve defaults")
    data, source = photo()
    with tempfile.TemporaryDirectory() as tmp:
        card, what = pick_card(Path(tmp))
        print(f"model: {what}\nimage: {source} ({len(data):,} bytes)\nparams: max_batch_size={p.max_batch_size} "
              f"max_wait_ms={p.max_wait_ms} threads={p.threads} decode_threads={p.decode_threads}\n")
        model = Model(card, p.threads)                # in this process: ORT with the server's thread budget
        proc, url = start_server(card, p, Path(tmp) / "server.log")
        base, rows = [in_process(model, p, data, args.seconds / 2)], []   # the server idles meanwhile
        try:
            for concurrency in (1, 8, 32):
                before = batch_stats(url)
                n, errors, lat, elapsed = asyncio.run(load(url, data, concurrency, args.seconds))
                after = batch_stats(url)
                mean_batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
                rows.append((f"server, concurrency {concurrency}", n / elapsed, np.percentile(lat, 50) * 1e3,
                             np.percentile(lat, 99) * 1e3, mean_batch, errors, n))
                base.append(in_process(model, p, data, args.seconds / 2))
        finally:
            proc.terminate()
            proc.wait(30)
    # The machine is shared: in-process runs before and after every server phase show how much it drifted.
    ort32 = [b["ort32"] for b in base]
    print(f"{'mode':<32}{'img/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}{'errors':>8}{'requests':>10}")
    print(f"{'in-process ORT, batch 32':<32}{np.mean(ort32):>8.1f}{'':>9}{'':>9}{32:>7}    (runs: "
          f"{', '.join(f'{r:.1f}' for r in ort32)})")
    e2e = np.mean([b["e2e1"] for b in base])
    print(f"{'in-process decode+ORT, 1 image':<32}{e2e:>8.1f}{1e3 / e2e:>9.1f}{'':>9}{1:>7}")
    print(f"{'in-process decode only, 1 thread':<32}{np.mean([b['prep'] for b in base]):>8.1f}")
    for name, img_s, p50, p99, batch, errors, n in rows:
        print(f"{name:<32}{img_s:>8.1f}{p50:>9.1f}{p99:>9.1f}{batch:>7.1f}{errors:>8}{n:>10}")
    adjacent = (ort32[-2] + ort32[-1]) / 2                               # the runs either side of concurrency 32
    print(f"\nserver@32 / in-process ORT@32 = {rows[-1][1] / adjacent:.2f} (against the runs either side of it; "
          f"{rows[-1][1] / np.mean(ort32):.2f} against their mean)")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
