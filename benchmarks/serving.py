"""Part 5: the HTTP service under load against the in-process serving limit, with benchmarks/serve_bench.py's
own functions. First the limit: `stages.throughput.sweep` (decode + ONNX Runtime, every batch size and core
split) on the photo the clients send; the server then runs with the fastest setting found (the card it reads
carries the sweep, as the deploy stage's does). Clients send that photo, one per request, at concurrency 1, 8
and 32 for a fixed time each; the fastest setting runs in process again before and after every server phase,
and each server figure is divided by the mean of the two runs either side of it (client, server and ORT share
this machine's cores). Each phase also counts the CPU time of the server's process, of its nginx and of the
client per request, beside the in-process runs' CPU time per image: where a server's time goes past the limit.
"""
import asyncio
import dataclasses
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks import serve_bench
from benchmarks.timing import pairwise, section, spread, wall
from serve.model import Params
from stages import machine, runtime, throughput
from stages.card import write_card

LEVELS = (1, 8, 32)


def cpu_s(procs):
    """CPU seconds (user + system) that each of `procs` (psutil processes) has used so far."""
    return np.array([sum(q.cpu_times()[:2]) for q in procs])


def phase(url, data, concurrency, seconds, server):
    """One load phase against the server (a psutil process; its children are nginx's)."""
    procs, start = [server, *server.children(recursive=True), psutil.Process()], []
    before = serve_bench.batch_stats(url)
    n, errors, lat, elapsed = asyncio.run(serve_bench.load(url, data, concurrency, seconds,
                                                           lambda: start.append(cpu_s(procs))))
    cpu = (cpu_s(procs) - start[0]) / max(n, 1) * 1e3        # the timed part's, not the warm-up's
    after = serve_bench.batch_stats(url)
    return {"concurrency": concurrency, "img_s": n / elapsed, "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "errors": errors, "requests": n,
            "mean_batch": (after[0] - before[0]) / max(after[1] - before[1], 1),
            "cpu_ms": {"server": cpu[0], "nginx": cpu[1:-1].sum(), "client": cpu[-1]}}


def run(onnx_path, variant, work, seconds, repeats):
    """Part 5's result for the ONNX file `onnx_path` (`variant` names it)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    data, source = serve_bench.photo()
    sweep = throughput.Sweep(seconds=seconds / 10, rounds=2)
    limit = throughput.measure(onnx_path, [data], sweep)
    best = limit["best"]
    card = work / "card.json"                       # as the server reads one (the SHA-256 is checked at start)
    write_card(card, {"model": Path(onnx_path).resolve(), "variant": variant, "git_rev": "bench",
                      "built_on": machine.cpu(), "serving": limit})
    p = section(Params, "serve")
    runners = [runtime.Runner(onnx_path, best["threads"], spinning=False) for _ in range(best["lanes"])]
    decode = throughput.decoder(runtime.metadata(runners[0].sess)[1])

    cpu_ms = []                                     # this process's CPU time per image, run by run

    def inprocess():                                # the server idles meanwhile
        cpu = time.process_time()
        img_s, took = wall(throughput.rate, runners, [data], decode, best["batch"], best["decode_threads"],
                           seconds / 2)
        cpu_ms.append((time.process_time() - cpu) / (img_s * took) * 1e3)
        return img_s

    (proc, url), start = wall(serve_bench.start_server, card, p, work / "server.log")
    server = psutil.Process(proc.pid)
    base, phases = [inprocess()], []
    try:
        for r in range(repeats):
            for c in LEVELS:
                phases.append(phase(url, data, c, seconds, server))
                base.append(inprocess())
                phases[-1]["inprocess"] = (base[-2] + base[-1]) / 2
                print(f"bench: serving repeat {r + 1}/{repeats}, concurrency {c}: {phases[-1]['img_s']:.1f} img/s "
                      f"({phases[-1]['img_s'] / phases[-1]['inprocess']:.2f}x the in-process limit)")
    finally:
        proc.terminate()
        proc.wait(30)
    levels = {}
    for c in LEVELS:
        ph = [x for x in phases if x["concurrency"] == c]
        levels[str(c)] = {**{k: spread([x[k] for x in ph], 2) for k in ("img_s", "p50_ms", "p99_ms", "mean_batch")},
                          "errors": sum(x["errors"] for x in ph), "requests": sum(x["requests"] for x in ph),
                          "vs_limit": pairwise([x["img_s"] for x in ph], [x["inprocess"] for x in ph]),
                          "cpu_ms": {k: spread([x["cpu_ms"][k] for x in ph], 2) for k in ("server", "nginx", "client")}}
    return {"model": variant, "image": source, "image_bytes": len(data), "seconds": seconds, "repeats": repeats,
            "params": {k: v for k, v in dataclasses.asdict(p).items()
                       if k in ("max_batch_size", "max_wait_ms", "threads", "lanes", "decode_threads")},
            "server_start_s": round(start, 1), "levels": levels, "limit": limit, "inprocess": spread(base, 2),
            "inprocess_cpu_ms": spread(cpu_ms, 2)}
