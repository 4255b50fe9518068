"""Benchmark, the prepare half of "Scale": on generated 1600x1200 JPEGs, prepare's images/s at 1 and 2 workers
(manifests compared byte for byte), the incremental re-run after adding 10 files to N as a fraction of the first
run (and its manifest against a run from scratch), and the peak memory of prepare's process tree at 1,000 and N
images. Every figure is measured here, side by side in one run; prints a markdown table, returns a dict.

    python -m benchmarks.scale --n 5000      # the goals: 2 workers >= 1.8x of 1; re-run <= 10 % of the first
"""
import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageDraw, ImageFilter
from stages.machine import describe

ROOT = Path(__file__).resolve().parents[1]
SIZE = (1600, 1200)
CLASSES = ("a", "b", "c")
ADDED = 10


def photo(path, seed, size=SIZE):
    """A photo-like JPEG: smooth colour fields, soft-edged shapes, mid-frequency texture and sensor grain, so it
    compresses like a photo (~0.4 MB at quality 90), not like a flat gradient (~50 KB). Integer arithmetic and
    one grain field per process: generating must not cost more than what is measured."""
    rng = np.random.default_rng(seed)
    w, h = size
    half = (w // 2, h // 2)
    im = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(half, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(8, 20))):
        x, y, r = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2)), int(rng.integers(w // 60, w // 12))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x - r, y - r // 2, x + r, y + r // 2], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    im = im.filter(ImageFilter.GaussianBlur(1)).resize(size, Image.Resampling.BICUBIC)
    texture = Image.fromarray(rng.integers(0, 38, (h // 6, w // 6, 3), dtype=np.uint8)).resize(
        size, Image.Resampling.BILINEAR)
    dy, dx = (int(v) for v in rng.integers(0, 64, 2))
    px = (np.asarray(im, np.int16) + np.asarray(texture, np.int16) - 19
          + _grain(size)[dy:dy + h, dx:dx + w])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path.stat().st_size


_GRAIN = {}


def _grain(size):
    """Gaussian grain (sd 4 levels) a little larger than `size`, made once per process; each image a window."""
    if size not in _GRAIN:
        rng = np.random.default_rng(12345)
        _GRAIN[size] = np.rint(rng.normal(0, 4, (size[1] + 64, size[0] + 64, 3))).astype(np.int16)
    return _GRAIN[size]


def generate(root, seeds):
    """One JPEG per seed under root/<class>/, on every core; returns the mean size in bytes."""
    paths = [root / CLASSES[s % len(CLASSES)] / f"{s:06d}.jpg" for s in seeds]
    with ProcessPoolExecutor() as pool:
        sizes = list(pool.map(photo, paths, seeds, chunksize=16))
    return sum(sizes) / max(1, len(sizes))


def watch(proc, every=0.05):
    """Poll `proc` and its descendants until it exits: (peak summed RSS in bytes, CPU seconds of the tree). RSS
    is an upper bound (pages forked workers share count once per process); CPU misses each process's last poll
    interval. CPU time is what the scheduler cannot hide: with sched_autogroup, other sessions on a busy
    machine cap this session's share however many workers it runs."""
    peak, cpu, ps = 0, {}, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [ps] + ps.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree))
            cpu.update({p.pid: sum(p.cpu_times()[:2]) for p in tree})
        except psutil.Error:
            pass
        time.sleep(every)
    return peak, sum(cpu.values())


def prepare(work, source, workers, cache=None):
    """`python -m stages.prepare` as DVC runs it, in `work` (its own params.yaml): wall seconds, peak RSS bytes
    and CPU seconds of its process tree."""
    work.mkdir(exist_ok=True)
    (work / "params.yaml").write_text(f"prepare:\n  source: {source}\n  workers: {workers}\n")
    cmd = [sys.executable, "-m", "stages.prepare", "--out", "out"] + (["--cache", str(cache)] if cache else [])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    box = {}
    err = threading.Thread(target=lambda: box.update(err=proc.stderr.read()))   # drain tqdm's output
    err.start()
    peak, cpu = watch(proc)
    err.join()
    if proc.wait():
        raise RuntimeError(f"prepare failed: {box['err'][-2000:]}")
    return time.perf_counter() - t0, peak, cpu


def link_first(src, dst, n):
    """dst/ holding hard links to the first `n` images of src/ (by name): a smaller set at no generation cost."""
    for f in sorted(src.rglob("*.jpg"))[:n]:
        (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(f, dst / f.parent.name / f.name)


def run(n=5000, small=1000, tmp=None):
    """Measure everything at N images (and the worker ratio and the first memory point at `small`)."""
    small = min(small, n)
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        d = Path(d)
        t0 = time.perf_counter()
        mean = generate(d / "src", range(n))
        generate(d / "added", range(n, n + ADDED))
        gen_s = time.perf_counter() - t0
        link_first(d / "src", d / "small", small)
        manifest = (lambda w: (w / "out" / "manifest.csv").read_bytes())
        w = d / "work"
        load = os.getloadavg()[0]
        s1, m_small1, c1 = prepare(w, d / "small", 1, d / "c1")
        serial = manifest(w)
        s2, m_small, c2 = prepare(w, d / "small", 2, d / "c2")
        identical = manifest(w) == serial
        big, cache = (d / "small", d / "c2") if small == n else (d / "src", d / "cn")
        first, m_big, c_first = (s2, m_small, c2) if small == n else prepare(w, big, 2, cache)
        for f in sorted((d / "added").rglob("*.jpg")):
            os.link(f, big / f.parent.name / f.name)
        again, _, c_again = prepare(w, big, 2, cache)
        incremental = manifest(w)
        prepare(w, big, 2)                                   # from scratch, no cache
        same = manifest(w) == incremental
    return {"n": n, "small": small, "mean_jpeg_kb": mean / 1024, "generate_s": gen_s,
            "img_s_1": small / s1, "img_s_2": small / s2, "speedup": s1 / s2, "manifests_identical": identical,
            "cpu_ms_1": 1000 * c1 / small, "cpu_ms_2": 1000 * c2 / small,
            "first_s": first, "rerun_s": again, "rerun_fraction": again / first,
            "rerun_cpu_fraction": c_again / c_first, "rerun_equals_scratch": same,
            "peak_mb_small_1": m_small1 / 2**20, "peak_mb_small": m_small / 2**20, "peak_mb_n": m_big / 2**20,
            "cpu": describe(), "load_before": load, "load_after": os.getloadavg()[0]}




def table(r):
    """The figures as a markdown table; every one measured in this run."""
    rows = [("prepare images/s, 1 worker", f"{r['img_s_1']:.1f}", f"{r['small']} images"),
            ("prepare images/s, 2 workers", f"{r['img_s_2']:.1f}", f"{r['small']} images"),
            ("speed-up, 2 workers vs 1", f"{r['speedup']:.2f}x", "goal >= 1.8x"),
            ("manifests identical (1 vs 2 workers)", str(r["manifests_identical"]), "byte for byte"),
            ("CPU ms per image, 1 worker", f"{r['cpu_ms_1']:.0f}", "process tree, user + system"),
            ("CPU ms per image, 2 workers", f"{r['cpu_ms_2']:.0f}", "the pool's overhead is the difference"),
            (f"first run, {r['n']} images (s)", f"{r['first_s']:.1f}", "2 workers, cold cache"),
            (f"re-run after adding {ADDED} (s)", f"{r['rerun_s']:.1f}", "2 workers, warm cache"),
            ("re-run / first run", f"{100 * r['rerun_fraction']:.1f} %", "goal <= 10 %"),
            ("re-run / first run, CPU time", f"{100 * r['rerun_cpu_fraction']:.1f} %", "process tree"),
            ("re-run manifest = from scratch", str(r["rerun_equals_scratch"]), "byte for byte"),
            (f"peak RSS, {r['small']} images, 1 worker (MB)", f"{r['peak_mb_small_1']:.0f}", "process tree"),
            (f"peak RSS, {r['small']} images, 2 workers (MB)", f"{r['peak_mb_small']:.0f}", "process tree"),
            (f"peak RSS, {r['n']} images, 2 workers (MB)", f"{r['peak_mb_n']:.0f}", "process tree")][
           :None if r["n"] > r["small"] else -1]
    lines = [f"Scale: prepare on {r['n']} generated {SIZE[0]}x{SIZE[1]} JPEGs (mean {r['mean_jpeg_kb']:.0f} KB, "
             f"made in {r['generate_s']:.0f} s); CPU: {r['cpu']}; 1-min load average {r['load_before']:.1f} before, "
             f"{r['load_after']:.1f} after",
             "", "| measured | value | note |", "|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="images for the incremental re-run and the memory")
    ap.add_argument("--small", type=int, default=1000, help="images for the 1 vs 2 worker comparison")
    args = ap.parse_args()
    print(table(run(args.n, args.small)))


if __name__ == "__main__":
    main()
