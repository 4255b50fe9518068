"""Connection and decoding attacks on the real server (nginx + uvicorn, as `make serve` starts it), on 127.0.0.1
only, bounded in count and time; prints what held. `python -m benchmarks.attack [--card outputs/deploy/card.json]`.

Silent and slowloris sockets beside /healthz and /predict, a 1 MiB header, a 413 body, maximal 16-bit PNG requests
ahead of a small JPEG (clients staying, then clients gone), and the server's RSS after warm-up, a load and a
bad-input zoo. Each check is what issue #13 names as done.
"""
import argparse
import concurrent.futures
import dataclasses
import io
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.serve_bench import start_server
from serve.model import Params
from stages.config import cli, load_section


def jpeg(size=(640, 480), seed=0):
    """A photo-sized JPEG, ~36 KB at 640x480: smooth gradients and a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size[1], :size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) * 127 / sum(size)], -1)
    pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def png16(side):
    """A 16-bit grey PNG of side x side pixels that compresses to little: the cheapest way to cost a decoder much."""
    a = np.zeros((side, side), np.uint16)
    a[::97, :] = 40_000
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def multipart(parts, boundary="atk"):
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="i"; filename="{i}.png"\r\n'
                    f"Content-Type: image/png\r\n\r\n".encode() + d + b"\r\n" for i, d in enumerate(parts))
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


def timed_predict(url, data, ctype="image/jpeg", timeout=30):
    t = time.perf_counter()
    r = httpx.post(url + "/predict", content=data, headers={"content-type": ctype}, timeout=timeout)
    return r.status_code, time.perf_counter() - t


def closed_within(sock, limit):
    """Seconds until the server closes `sock` (reading and discarding), or None if it is still open at `limit`."""
    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < limit:
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - start
    return None


def slow_sockets(host, port, p, url, photo, silent=64, slow=64):
    """`silent` sockets that send nothing and `slow` ones dripping a header byte every 0.5 s, then /healthz and a
    /predict timed beside them; then how long the server took to close them all."""
    socks = [socket.create_connection((host, port)) for _ in range(silent + slow)]
    start, stop = time.monotonic(), threading.Event()

    def drip():
        for s in socks[silent:]:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        while not stop.wait(0.5):
            for s in socks[silent:]:
                try:
                    s.sendall(b"X")
                except OSError:
                    pass
    threading.Thread(target=drip, daemon=True).start()
    time.sleep(0.3)
    t = time.perf_counter()
    health = httpx.get(url + "/healthz", timeout=10).status_code
    health_s = time.perf_counter() - t
    predict, predict_s = timed_predict(url, photo, timeout=10)
    limit = p.header_timeout_s + 5
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        closed = list(pool.map(lambda s: closed_within(s, limit - (time.monotonic() - start)), socks))
    stop.set()
    for s in socks:
        s.close()
    held = [c for c in closed if c is None]
    return {"healthz": health, "healthz_s": health_s, "predict": predict, "predict_s": predict_s,
            "still_open": len(held), "all_closed_s": None if held else time.monotonic() - start}


def big_header(host, port, size=1 << 20):
    with socket.create_connection((host, port), timeout=10) as s:
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
        except OSError:                             # the server answered and closed before the end
            pass
        head = s.recv(4096).split(b"\r\n", 1)[0]
    return int(head.split()[1]) if head else None


def body_413(host, port, p):
    """A body over the limit: the status, and whether the connection closes while the client keeps sending."""
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                  f"Content-Length: {p.max_body_bytes * 10}\r\n\r\n".encode())
        head = s.recv(4096)
        status = int(head.split()[1])
        start, closed = time.monotonic(), None
        s.settimeout(0.5)
        while time.monotonic() - start < p.header_timeout_s + 5:
            try:
                s.sendall(b"x" * 65536)
                if s.recv(65536) == b"":
                    closed = time.monotonic() - start
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = time.monotonic() - start
                break
    return {"status": status, "closed_s": closed}


def decode_flood(url, p, photo, leave_after=None, requests=3):
    """`requests` multipart requests at the pixel budget of 16-bit PNGs, then the photo, timed. With `leave_after`
    seconds the flooding clients close their connections that soon after sending."""
    side = int((p.max_pixels) ** 0.5)
    n = max(1, min(p.max_images, p.max_request_pixels // (side * side)))
    body, ctype = multipart([png16(side)] * n)
    host, port = url.split("//")[1].split(":")
    socks = []
    for _ in range(requests):
        s = socket.create_connection((host, int(port)))
        s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        socks.append(s)
    if leave_after is not None:
        time.sleep(leave_after)
        for s in socks:
            s.close()
    time.sleep(0.1)
    status, seconds = timed_predict(url, photo)
    for s in socks:
        s.close()
    return {"images_per_request": n, "side": side, "request_bytes": len(body), "status": status, "photo_s": seconds}


def zoo(url, p):
    """A small bad-input zoo (every kind answered 4xx), the maximal 16-bit requests among it; statuses seen."""
    side = int(p.max_pixels ** 0.5)
    big16 = png16(side)
    photo = jpeg()
    cases = [(b"hello" * 100, "image/png"), (photo[: len(photo) // 2], "image/jpeg"), (b"", "image/jpeg"),
             (photo, "text/plain"), (png16(side + 1000), "image/png"), (big16, "image/png")]
    body, ctype = multipart([big16] * max(1, min(p.max_images, p.max_request_pixels // (side * side))))
    cases += [(body, ctype)] * 3 + [multipart([big16] * p.max_images)]       # the last: over the budget
    seen = {}
    with httpx.Client(timeout=60) as c:
        for data, ct in cases:
            r = c.post(url + "/predict", content=data, headers={"content-type": ct})
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
    return seen


def load(url, photo, seconds=5, clients=16):
    stop, codes = time.monotonic() + seconds, []

    def client():
        with httpx.Client(timeout=30) as c:
            while time.monotonic() < stop:
                codes.append(c.post(url + "/predict", content=photo, headers={"content-type": "image/jpeg"})
                             .status_code)
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: client(), range(clients)))
    return {"requests": len(codes), "errors": sum(c != 200 for c in codes)}


def run(card, p, log=None, load_s=5):
    """Every attack against a fresh server for `card` with params `p`; a dict of what was measured."""
    log = log or Path(tempfile.mkdtemp()) / "server.log"
    proc, url = start_server(card, p, log)
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    p = dataclasses.replace(p, host=host, port=port)
    photo = jpeg()
    try:
        for _ in range(5):                           # warm-up: both ONNX Runtime sessions, the decoders
            timed_predict(url, photo)
        httpx.post(url + "/predict", content=multipart([photo, photo])[0],
                   headers={"content-type": multipart([])[1]}, timeout=30)
        out = {"photo_bytes": len(photo), "rss_warm_mb": rss_mb(proc.pid)}
        out["sockets"] = slow_sockets(host, port, p, url, photo)
        out["header_1mib"] = big_header(host, port)
        out["body_413"] = body_413(host, port, p)
        out["flood_staying"] = decode_flood(url, p, photo)
        time.sleep(p.header_timeout_s)               # let the first flood drain
        out["flood_gone"] = decode_flood(url, p, photo, leave_after=0.2)
        out["load"] = load(url, photo, load_s)
        out["rss_after_load_mb"] = rss_mb(proc.pid)
        out["zoo"] = zoo(url, p)
        time.sleep(1)
        out["rss_after_zoo_mb"] = rss_mb(proc.pid)
        out["healthz_after"] = httpx.get(url + "/healthz", timeout=5).status_code
    finally:
        proc.terminate()
        proc.wait(30)
    return out


def verdicts(r, p):
    s = r["sockets"]
    return [("64 silent + 64 slowloris: /healthz and /predict within 1 s",
             s["healthz"] == 200 and s["predict"] == 200 and max(s["healthz_s"], s["predict_s"]) < 1),
            (f"slow sockets closed within the header timeout ({p.header_timeout_s} s) + 1 s",
             s["all_closed_s"] is not None and s["all_closed_s"] < p.header_timeout_s + 1),
            ("1 MiB header gets 431", r["header_1mib"] == 431),
            ("413, then the connection closes", r["body_413"]["status"] == 413 and r["body_413"]["closed_s"] is not None),
            ("photo behind 3 maximal 16-bit requests within 5 s",
             r["flood_staying"]["status"] == 200 and r["flood_staying"]["photo_s"] < 5),
            ("... within 2 s once those clients left",
             r["flood_gone"]["status"] == 200 and r["flood_gone"]["photo_s"] < 2),
            ("zoo: no 5xx but 503, still healthy", all(k < 500 or k == 503 for k in r["zoo"])
             and r["healthz_after"] == 200),
            ("RSS after the zoo within 1.5x of after warm-up", r["rss_after_zoo_mb"] < 1.5 * r["rss_warm_mb"])]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--card", default="outputs/deploy/card.json")
    args = ap.parse_args()
    p = load_section(Params, "serve")
    r = run(args.card, p)
    print(json.dumps(r, indent=1, default=lambda x: round(x, 3)))
    print(f"cpu: {os.cpu_count()} cores")
    for what, held in verdicts(r, p):
        print(f"{'held  ' if held else 'FAILED'}  {what}")


if __name__ == "__main__":
    cli(main)
