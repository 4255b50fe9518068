"""Batch prediction images/s in one run on one machine (prints, never asserts): today's single-process
predict_folder, Ray Data (serve/batch.py) on this machine, and the machine's own limit.

The limit: in-process decoding on every core (a thread per core: PIL releases the GIL) and ONNX Runtime on every
core at its best batch size, each measured alone here; both need the same cores, so together they cannot beat
1 / (1/decode + 1/infer) images/s. Images: the shipped photos copied and resized to `--n` distinct JPEGs.
Run from the project root: python -m benchmarks.batch_bench [--card outputs/deploy/card.json] [--n 2000]
"""
import argparse
import concurrent.futures
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from serve import batch, predict_folder
from serve.model import Model, Params, preprocess
from stages import runtime
from stages.config import UserError, cli, load_section
from stages.machine import describe

CARD = Path("outputs/deploy/card.json")
BATCHES = (1, 2, 4, 8, 16, 32)


def make_images(dest, n, source=Path("data/hymenoptera")):
    """`n` JPEGs from the shipped photos, each resized by its own factor (0.6-1.4), so no two files are alike."""
    photos = sorted(f for f in source.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg"))
    if not photos:
        raise UserError(f"no JPEG photos under {source}")
    for i in range(n):
        with Image.open(photos[i % len(photos)]) as im:
            scale = 0.6 + 0.8 * ((i * 0.618) % 1)
            im.convert("RGB").resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))),
                                     Image.Resampling.BILINEAR).save(dest / f"{i:05d}.jpg", quality=90)
    return dest


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def limit(model, files, cores, infer_images=128):
    """(images/s of the limit, decode images/s, {batch: infer images/s}) in this process."""
    def one(f):
        return preprocess(f.read_bytes(), model.transform, Params.max_pixels)

    with concurrent.futures.ThreadPoolExecutor(cores) as pool:
        xs = []
        decode_s = timed(lambda: xs.extend(pool.map(one, files)))
    sess = runtime.session(model.card["model"], threads=cores)
    name = sess.get_inputs()[0].name
    infer = {}
    for b in BATCHES:
        x = np.stack(xs[:b])
        sess.run(None, {name: x})                         # warm-up: the first run plans memory
        reps = max(1, infer_images // b)
        infer[b] = reps * b / timed(lambda: [sess.run(None, {name: x}) for _ in range(reps)])
    decode = len(files) / decode_s
    return 1 / (1 / decode + 1 / max(infer.values())), decode, infer




def run(card, n, p, work):
    images = work / f"images-{n}"
    if len(list(images.glob("*.jpg"))) != n:          # a --work folder keeps them between runs
        images.mkdir(parents=True, exist_ok=True)
        make_images(images, n)
    files = sorted(images.iterdir())
    model = Model(card, p.threads)
    cores = os.cpu_count()
    r = {"cpu": describe(), "n": len(files), "variant": model.card["variant"], "single_p": model.resolve(p)}
    r["single_s"] = timed(lambda: predict_folder.run(card, images, work / "single.csv", p))
    from stages.cluster import ray_init
    r["ray_init_s"] = timed(ray_init)
    small = work / "images-16"                         # a job this small costs Ray Data's start-up and little else
    small.mkdir(exist_ok=True)
    for f in files[:16]:
        shutil.copy(f, small)
    r["ray_small_s"] = timed(lambda: batch.run(card, small, work / "ray-small", p))
    r["ray_s"] = timed(lambda: batch.run(card, images, work / "ray", p))
    r["limit"], r["decode"], r["infer"] = limit(model, files, cores)
    r["single"], r["ray"] = len(files) / r["single_s"], len(files) / r["ray_s"]
    return r


def report(r, p):
    best = max(r["infer"], key=r["infer"].get)
    lines = [f"batch prediction, {r['n']} images, {r['variant']}, {r['cpu']}",
             f"  single-process predict_folder: {r['single']:7.1f} img/s  (batch {r['single_p'].max_batch_size}, "
             f"{r['single_p'].threads} ORT threads, {r['single_p'].decode_threads} decode threads)",
             f"  Ray Data (serve/batch.py):     {r['ray']:7.1f} img/s  (batch {p.batch_size}, actors "
             f"{p.batch_actors or 'auto'} x {p.batch_threads} threads; ray init {r['ray_init_s']:.1f} s not counted)",
             f"  Ray Data on 16 images:         {r['ray_small_s']:7.1f} s      (the fixed cost of a job: actors start, "
             f"load the model)",
             f"  machine limit:                 {r['limit']:7.1f} img/s  (decode {r['decode']:.1f} img/s on every core, "
             f"ORT {r['infer'][best]:.1f} img/s at its best batch {best})",
             "  ORT img/s by batch: " + ", ".join(f"{b}: {v:.1f}" for b, v in r["infer"].items()),
             f"  ratios: Ray Data / limit {r['ray'] / r['limit']:.2f} (goal >= 0.85), Ray Data / single-process "
             f"{r['ray'] / r['single']:.2f}, single-process / limit {r['single'] / r['limit']:.2f}"]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--card", default=str(CARD), help="the model card (default: the deploy stage's)")
    ap.add_argument("--n", type=int, default=2000, help="images to generate from the shipped photos")
    ap.add_argument("--work", help="a folder to keep the images and outputs in (default: a temporary one)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="serve params to override")
    args = ap.parse_args()
    p = load_section(Params, "serve")
    p = dataclasses.replace(p, **{k: int(v) for k, v in (s.split("=", 1) for s in args.set)})
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for old in ("ray", "ray-small", "single.csv"):           # a fresh run scores everything again
            shutil.rmtree(work / old, ignore_errors=True) if (work / old).is_dir() else (work / old).unlink(True)
        print(report(run(args.card, args.n, p, work), p))


if __name__ == "__main__":
    cli(main)
