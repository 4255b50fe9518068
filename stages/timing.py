"""The deploy stage's timing: one model per spawned process (an ONNX file or a PyTorch checkpoint), timed in
rotated rounds side by side.

Timing, at `threads` threads (PyTorch too): every variant in a process of its own, loaded as a service loads
it, timed in blocks interleaved round by round (a machine that slows down slows every variant alike). Batch-1
latency first, then batch throughput, then batch-1 latency once more. The order matters for PyTorch eager:
in a process that has only ever run single images, glibc hands the freed activations back to the system
after every call and the next call page-faults them in again (about 6,000 minor faults, 24 MB, per call for
Lite0 at 256 px: 55 ms here). One batch-32 call raises glibc's trim threshold past that, and the same
batch-1 call then faults nothing (38 ms). So does the scoring at batch 32 the deploy stage does first, which is
why the timing happens elsewhere. `latency_ms_p50`, the service's case, decides; `latency_ms_p50_after_batch`
shows the other. ONNX Runtime keeps its own memory arena and is much the same in both.

Apart from `stages.runtime` so that the serving library imports no stage: only a checkpoint's timing imports
torch and `stages.prune`, inside `load`.
"""
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from stages.runtime import Runner

_model = None            # the timing worker's model: one per process


def load(path, threads):
    """Timing worker's initializer: an ONNX file through `Runner`, any other file as a PyTorch checkpoint run
    eagerly (in eval mode, under `torch.inference_mode()`)."""
    global _model
    if Path(path).suffix == ".onnx":
        _model = Runner(path, threads)
        return
    import torch
    from stages.checkpoint import load_model    # train's checkpoints and prune's alike

    torch.set_num_threads(threads)
    model = load_model(path)[0]

    def eager(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    _model = eager


def calls(x, n):
    """Seconds taken by each of `n` calls of the worker's model on `x`."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        _model(x)
        out.append(time.perf_counter() - t)
    return out


def paired_speedup(v, base):
    """(the speed-up of variant `v` over `base` that decides, rounds): the lower quartile of the per-round
    ratios of batch-1 latency. Each round times every variant back to back, so a round's ratio cancels what
    slowed the whole machine during it, and the lower quartile is what a slower quarter of the rounds still
    shows: a variant that only sometimes clears `min_speedup` does not replace the other (a ratio of medians
    flips with noise). A table without `latency_ms_rounds` counts as one round of medians."""
    a, b = (np.asarray(t.get("latency_ms_rounds") or [t["latency_ms_p50"]], float) for t in (base, v))
    return round(float(np.percentile(a / b, 25)), 3), len(a)


def rounds(workers, xs, repeats, p):
    """{variant: seconds per call} on its input `xs[variant]`: `p.warmup` untimed calls each, then `p.rounds`
    rounds of `repeats` calls per variant, the order rotated every round so that no variant always goes first."""
    names, out = list(workers), {n: [] for n in workers}
    for n in names:
        workers[n].submit(calls, xs[n], p.warmup).result()
    for r in range(p.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            out[n] += workers[n].submit(calls, xs[n], repeats).result()
    return out


def bench(files, x1, xb, p):
    """Per variant file: batch-1 latency (ms) on `x1[variant]`, full-batch throughput (images/s) on
    `xb[variant]` (each at the variant's own input size), then batch-1 latency again, each variant in a fresh
    process of its own (see the module's docstring). `latency_ms_rounds`: the median batch-1 latency of each
    of the 2 x `p.rounds` rounds, for `paired_speedup`."""
    spawn = multiprocessing.get_context("spawn")
    workers = {n: ProcessPoolExecutor(1, spawn, load, (str(f), p.threads)) for n, f in files.items()}
    try:
        lat, thr, again = (rounds(workers, x, k, p) for x, k in ((x1, p.repeats), (xb, p.batch_repeats),
                                                                  (x1, p.repeats)))
    finally:
        for w in workers.values():
            w.shutdown(cancel_futures=True)
    r2 = lambda v: round(float(v), 2)  # noqa: E731
    ms = {n: np.array(v) * 1e3 for n, v in lat.items()}
    per_round = {n: np.median(np.reshape(np.concatenate([lat[n], again[n]]) * 1e3, (2 * p.rounds, -1)), axis=1)
                 for n in files}
    return {n: {"latency_ms_p50": r2(np.median(ms[n])), "latency_ms_rounds": [r2(v) for v in per_round[n]],
                "latency_ms_p99": r2(np.percentile(ms[n], 99)),
                "latency_ms_min": r2(ms[n].min()), "latency_ms_max": r2(ms[n].max()),
                "latency_ms_p50_after_batch": r2(np.median(again[n]) * 1e3),
                "throughput_b1": r2(1 / np.median(lat[n])), f"throughput_b{b}": r2(b / np.median(thr[n])),
                f"throughput_b{b}_min": r2(b / max(thr[n])), f"throughput_b{b}_max": r2(b / min(thr[n]))}
            for n, b in ((n, len(xb[n])) for n in files)}
