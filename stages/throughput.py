"""The serving limit: how many images a second one machine turns from JPEG bytes into logits, in process,
at each batch size and split of its cores between concurrent ONNX Runtime calls ("lanes") and intra-op threads.

The deploy stage measures it for the model it ships and records the fastest setting in the card ("serving");
the server takes its batching defaults from there, and the serving benchmark divides the server's rate by it.
Each setting runs as the server runs it: `decode_threads` threads decode and preprocess (`stages.presets`), and
`lanes` threads each take the next `batch` decoded images and run them through a `runtime.Runner` of their own
with `threads` intra-op threads, the next batch decoding meanwhile. Settings are timed in rotated rounds and
each keeps its median, so a slow moment of a shared machine does not pick the winner.
Torch-free (the server imports it); ONNX Runtime's own perf tools time the model alone, not decode beside it.
"""
import concurrent.futures
import dataclasses
import io
import multiprocessing
import os
import threading
import time

import numpy as np

from stages import presets, runtime

BATCHES = (1, 2, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Sweep:
    seconds: float = 1.0     # timed per setting per round
    rounds: int = 2          # rotated rounds over all settings
    images: int = 32         # distinct val images decoded in turn
    batches: tuple = BATCHES

    def __post_init__(self):
        object.__setattr__(self, "batches", tuple(self.batches))
        if self.seconds <= 0 or self.rounds < 1 or self.images < 1 or not self.batches \
                or min(self.batches) < 1:
            raise ValueError(f"seconds must be > 0, rounds, images and every batch size >= 1, not {self}")


def cores():
    """The CPUs this process may run on (a container's or `taskset`'s share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def splits(n):
    """(lanes, threads) pairs that use all `n` cores: every divisor of `n` as the number of lanes."""
    return [(lanes, n // lanes) for lanes in range(1, n + 1) if n % lanes == 0]


def decoder(pp):
    """Image bytes -> (3, H, W) float32 network input, as the server preprocesses (`stages.presets`)."""
    transform = presets.eval_transform(pp).array
    return lambda data: np.asarray(transform(presets.load_rgb(io.BytesIO(data))))


def rate(runners, images, decode, batch, decode_threads, seconds):
    """Images/s over `seconds` (after one untimed batch per lane) with one lane per runner."""
    counted, window = [0] * len(runners), []
    ready = threading.Barrier(len(runners), lambda: window.append(time.perf_counter()), timeout=120)

    def lane(i, pool):
        k, first = i * batch, True
        ahead = [pool.submit(decode, images[(k + j) % len(images)]) for j in range(batch)]
        try:
            while first or time.perf_counter() < window[0] + seconds:
                x = np.stack([f.result() for f in ahead])
                k += batch * len(runners)
                ahead = [pool.submit(decode, images[(k + j) % len(images)]) for j in range(batch)]
                runners[i](x)
                if first:
                    first = False
                    ready.wait()
                else:
                    counted[i] += batch
        except BaseException:
            ready.abort()                       # the other lanes stop waiting for this one
            raise
        finally:
            for f in ahead:
                f.cancel()

    with concurrent.futures.ThreadPoolExecutor(decode_threads) as pool, \
            concurrent.futures.ThreadPoolExecutor(len(runners)) as lanes:
        for f in [lanes.submit(lane, i, pool) for i in range(len(runners))]:
            f.result()
        return sum(counted) / (time.perf_counter() - window[0])


def sweep(path, images, p, n=None):
    """{"cores", "settings": [{"batch", "lanes", "threads", "decode_threads", "img_s"}], "best": one of them}
    for the ONNX file `path` on the image bytes `images` and `n` cores (default: `cores()`)."""
    n = n or cores()
    images = list(images)[:p.images]
    decode = decoder(runtime.metadata(runtime.session(path))[1])
    settings = [(b, lanes, threads) for b in p.batches for lanes, threads in splits(n)]
    runners, seen = {}, {k: [] for k in settings}
    for r in range(p.rounds):
        for b, lanes, threads in settings[r % len(settings):] + settings[:r % len(settings)]:
            have = runners.setdefault(threads, [])
            have += [runtime.Runner(path, threads, spinning=False) for _ in range(lanes - len(have))]
            seen[b, lanes, threads].append(rate(have[:lanes], images, decode, b, n, p.seconds))
    rows = [{"batch": b, "lanes": lanes, "threads": threads, "decode_threads": n,
             "img_s": round(float(np.median(v)), 1)} for (b, lanes, threads), v in seen.items()]
    return {"cores": n, "seconds": p.seconds, "rounds": p.rounds, "images": len(images), "settings": rows,
            "best": max(rows, key=lambda s: s["img_s"])}


def measure(path, images, p):
    """`sweep` of the image bytes `images` in a fresh spawned process: none of the caller's threads (torch's
    included) compete."""
    with concurrent.futures.ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as pool:
        return pool.submit(sweep, str(path), list(images)[:p.images], p).result()
