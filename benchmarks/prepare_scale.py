"""Benchmark: `prepare` on a generated folder of thousands of photo-sized JPEGs (peak memory, time), and what
the cached RGB copies save per training epoch against decoding the originals. Prints; asserts nothing.

    python -m benchmarks.prepare_scale --images 3000 --side 1600
"""
import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stages import presets
from stages.manifest import read_manifest


def make_folder(root, n, side, classes=("a", "b", "c")):
    rng = np.random.default_rng(0)
    for i in range(n):
        low = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        im = Image.fromarray(low).resize((side, side * 3 // 4), Image.Resampling.BICUBIC)
        path = root / classes[i % len(classes)] / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, quality=90)


def epoch_seconds(rows, column, pp, repeats=3):
    tf = presets.eval_transform(pp)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for r in rows:
            tf(presets.load_rgb(r[column]))
        times.append(time.perf_counter() - t0)
    return sorted(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--side", type=int, default=1600)
    ap.add_argument("--sample", type=int, default=200, help="images timed for the decode comparison")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_folder(tmp / "src", args.images, args.side)
        print(f"generated {args.images} JPEGs of {args.side}x{args.side * 3 // 4} in {time.perf_counter() - t0:.0f} s")
        (tmp / "params.yaml").write_text(f"prepare:\n  source: {tmp / 'src'}\n")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stages.prepare", "--out", str(tmp / "out")], cwd=tmp, check=True,
                       env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": ""})
        seconds = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"prepare: {args.images} images in {seconds:.0f} s ({args.images / seconds:.0f} img/s), "
              f"peak memory {peak_mb:.0f} MB")
        rows, _ = read_manifest(tmp / "out" / "manifest.csv")
        rows = rows[:args.sample]
        pp = presets.Preprocessing(224, 256, (0.5,) * 3, (0.5,) * 3)
        orig, cached = epoch_seconds(rows, "path", pp), epoch_seconds(rows, "cached", pp)
        print(f"decode + eval transform of {len(rows)} images, min/median/max of 3 (s): originals "
              f"{orig[0]:.2f}/{orig[1]:.2f}/{orig[2]:.2f}, cached copies {cached[0]:.2f}/{cached[1]:.2f}/"
              f"{cached[2]:.2f}; ratio (median) {orig[1] / cached[1]:.1f}x")


if __name__ == "__main__":
    main()
