"""Part 5: the HTTP service under load next to ONNX Runtime in-process, with benchmarks/serve_bench.py's own
functions: one real photo per request at concurrency 1, 8 and 32, each for a fixed time; in-process ORT at
batch 32 (same thread budget), alone and after decoding, runs before and after every server phase, and each server figure is divided by
the mean of the two runs either side of it (client, server and ORT share this machine's cores).
"""
import asyncio
import dataclasses
from pathlib import Path

import numpy as np

from benchmarks import serve_bench
from benchmarks.timing import pairwise, section, spread, wall
from serve.model import Model, Params
from stages.card import write_card

LEVELS = (1, 8, 32)


def phase(url, data, concurrency, seconds):
    before = serve_bench.batch_stats(url)
    n, errors, lat, elapsed = asyncio.run(serve_bench.load(url, data, concurrency, seconds))
    after = serve_bench.batch_stats(url)
    return {"concurrency": concurrency, "img_s": n / elapsed, "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "errors": errors, "requests": n,
            "mean_batch": (after[0] - before[0]) / max(after[1] - before[1], 1)}


def run(onnx_path, variant, work, seconds, repeats):
    """Part 5's result for the ONNX file `onnx_path` (`variant` names it)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    p = section(Params, "serve")
    data, source = serve_bench.photo()
    card = work / "card.json"                       # as the server reads one (the SHA-256 is checked at start)
    write_card(card, {"model": Path(onnx_path).resolve(), "variant": variant, "git_rev": "bench"})
    model = Model(card, p.threads)                  # in this process: ORT with the server's thread budget
    (proc, url), start = wall(serve_bench.start_server, card, p, work / "server.log")
    base, phases = [serve_bench.in_process(model, p, data, seconds / 2)], []   # the server idles meanwhile
    try:
        for r in range(repeats):
            for c in LEVELS:
                phases.append(phase(url, data, c, seconds))
                base.append(serve_bench.in_process(model, p, data, seconds / 2))
                for k in ("ort32", "e2e32"):
                    phases[-1][f"inprocess_{k}"] = (base[-2][k] + base[-1][k]) / 2
                print(f"bench: serving repeat {r + 1}/{repeats}, concurrency {c}: {phases[-1]['img_s']:.1f} img/s")
    finally:
        proc.terminate()
        proc.wait(30)
    levels = {}
    for c in LEVELS:
        ph = [x for x in phases if x["concurrency"] == c]
        levels[str(c)] = {**{k: spread([x[k] for x in ph], 2) for k in ("img_s", "p50_ms", "p99_ms", "mean_batch")},
                          "errors": sum(x["errors"] for x in ph), "requests": sum(x["requests"] for x in ph),
                          "vs_inprocess": pairwise([x["img_s"] for x in ph], [x["inprocess_ort32"] for x in ph]),
                          "vs_e2e32": pairwise([x["img_s"] for x in ph], [x["inprocess_e2e32"] for x in ph])}
    return {"model": variant, "image": source, "image_bytes": len(data), "seconds": seconds, "repeats": repeats,
            "params": {k: v for k, v in dataclasses.asdict(p).items()
                       if k in ("max_batch_size", "max_wait_ms", "threads", "decode_threads")},
            "server_start_s": round(start, 1), "levels": levels,
            "inprocess": {k: spread([b[k] for b in base], 2) for k in ("ort32", "e2e32", "e2e1", "prep")}}
