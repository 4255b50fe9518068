"""Batch prediction images/s in one run on one machine (prints, never asserts): today's single-process
predict_folder, Ray Data (serve/batch.py) on this machine, and the machine's own limit.

The limit: the serving limit of `stages.throughput` on 64 of the same files, swept before and after the jobs (JPEG
bytes to the model's outputs in one process, decode threads beside ONNX Runtime lanes, the best of batch 1-32 and
every split of the cores into lanes x intra-op threads; the serving benchmark divides the server by the same
figure), and timed again at the best batch right before each Ray Data job, which is divided by that one.
Images: the shipped photos copied and resized to `--n` distinct JPEGs.
Run from the project root: python -m benchmarks.batch_bench [--card outputs/deploy/card.json] [--n 2000] [--repeats 3]
"""
import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from benchmarks.timing import pairwise, spread
from serve import batch, predict_folder
from serve.model import Model, Params
from stages import throughput
from stages.config import UserError, cli, load_section
from stages.machine import describe

CARD = Path("outputs/deploy/card.json")
BESIDE_S = 3.0      # seconds the limit is timed at each split right before each Ray Data job
SMALL = 16          # images of the job that measures what any job costs: Ray Data's start-up and little else


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


def limit(model, files, sweep=throughput.Sweep()):
    """`stages.throughput`'s sweep of the model on these files' bytes: decode + ONNX Runtime images/s in one
    process at batch 1-32 (or `sweep`'s) and every split of the cores into lanes x threads, the server's own
    limit."""
    images = [f.read_bytes() for f in files[:64]]
    return throughput.measure(model.card["model"], images, dataclasses.replace(sweep, images=len(images)))


def fresh(work):
    """Remove the jobs' outputs: a job finding its earlier parts would score nothing."""
    for old in ("ray", "ray-small", "single.csv"):
        shutil.rmtree(work / old, ignore_errors=True) if (work / old).is_dir() else (work / old).unlink(True)


def run(card, n, p, work, repeats):
    """Single-process and Ray Data jobs alternated `repeats` times (a load that comes and goes hits both alike),
    the limit swept before and after them and timed again right before each Ray Data job at the batch the first
    sweep found best: the two sweeps of one run differed by up to 8 % on a shared machine, so each job is divided by
    the limit timed beside it."""
    images = work / f"images-{n}"
    if len(list(images.glob("*.jpg"))) != n:          # a --work folder keeps them between runs
        images.mkdir(parents=True, exist_ok=True)
        make_images(images, n)
    files = sorted(images.iterdir())
    model = Model(card, p.threads)
    r = {"cpu": describe(), "n": len(files), "variant": model.card["variant"], "single_p": model.resolve(p),
         "sweeps": [limit(model, files)], "single_s": [], "ray_s": []}
    from stages.cluster import ray_init
    r["ray_init_s"] = timed(ray_init)
    small = work / f"images-{SMALL}"
    small.mkdir(exist_ok=True)
    for f in files[:SMALL]:
        shutil.copy(f, small)
    fresh(work)
    # the first job in a Ray session pays once more (Ray Data's first use in this process and in the workers):
    # timed apart, so that the small jobs beside the large ones measure what every job costs
    r["ray_first_s"] = timed(lambda: batch.run(card, small, work / "ray-small", p))
    r["ray_small_s"], r["beside"] = [], []
    beside = throughput.Sweep(seconds=BESIDE_S, rounds=1, batches=(r["sweeps"][0]["best"]["batch"],))
    for _ in range(repeats):
        fresh(work)
        r["single_s"].append(timed(lambda: predict_folder.run(card, images, work / "single.csv", p)))
        r["ray_small_s"].append(timed(lambda: batch.run(card, small, work / "ray-small", p)))
        r["beside"].append(limit(model, files, beside)["best"]["img_s"])
        r["ray_s"].append(timed(lambda: batch.run(card, images, work / "ray", p)))
    r["ray_call_size"] = p.batch_size or batch.call_size_here(model.card, p.batch_threads, gpu=False)
    r["sweeps"].append(limit(model, files))
    r["limit"] = statistics.mean(s["best"]["img_s"] for s in r["sweeps"])
    r["single"], r["ray"] = ([len(files) / t for t in r[k]] for k in ("single_s", "ray_s"))
    return r


def rates(xs):
    s = spread(xs, 1)
    return f"{s['median']:7.1f} img/s  ({s['min']}-{s['max']} over {s['n']})"


def report(r, p):
    best = r["sweeps"][-1]["best"]
    single, ray = statistics.median(r["single"]), statistics.median(r["ray"])
    # what the images beyond the first SMALL cost, pair by pair (each large job beside its own small one)
    extra_s = statistics.median(big - small for big, small in zip(r["ray_s"], r["ray_small_s"]))
    steady = (r["n"] - SMALL) / extra_s if extra_s > 0 else float("nan")
    beside, ratio = statistics.median(r["beside"]), pairwise(r["ray"], r["beside"], 2)
    lines = [f"batch prediction, {r['n']} images, {r['variant']}, {r['cpu']}",
             f"  single-process predict_folder: {rates(r['single'])}  (batch {r['single_p'].max_batch_size}, "
             f"{r['single_p'].threads} ORT threads, {r['single_p'].decode_threads} decode threads)",
             f"  Ray Data (serve/batch.py):     {rates(r['ray'])}  (ORT calls of {r['ray_call_size']}, actors "
             f"{p.batch_actors or 'auto'} x {p.batch_threads} threads; ray init {r['ray_init_s']:.1f} s not counted)",
             f"  Ray Data on {SMALL} images:         {statistics.median(r['ray_small_s']):7.1f} s      (median over "
             f"{len(r['ray_small_s'])}: the fixed cost of a job, actors start and load the model; the session's first "
             f"job took {r['ray_first_s']:.1f} s)",
             f"  machine limit:                 {r['limit']:7.1f} img/s  (decode + ONNX Runtime in process, "
             f"stages.throughput, before and after the jobs: "
             f"{' and '.join(str(s['best']['img_s']) for s in r['sweeps'])}; batch {best['batch']}, "
             f"{best['lanes']} lane(s) x {best['threads']} thread(s))",
             "  in-process img/s by batch at that split: " + ", ".join(
                 f"{s['batch']}: {s['img_s']:.1f}" for s in r["sweeps"][-1]["settings"]
                 if (s["lanes"], s["threads"]) == (best["lanes"], best["threads"])),
             f"  limit beside each Ray Data job:{rates(r['beside'])}  (batch {r['sweeps'][0]['best']['batch']}, the "
             f"best split over {BESIDE_S:.0f} s each, timed right before the job)",
             f"  Ray Data beyond that job:      {steady:7.1f} img/s  (the images past the first {SMALL} over the "
             f"seconds past the {SMALL}-image job's, run beside it: what a job of many more images approaches, "
             f"{steady / beside:.2f}x the limit beside the jobs; nan where the job is too small to tell)",
             f"  ratios: Ray Data / the limit beside it {ratio['median']} ({ratio['min']}-{ratio['max']} over "
             f"{ratio['n']} pairs; goal >= 0.85; {ray / r['limit']:.2f} against the sweeps' mean), Ray Data / "
             f"single-process {ray / single:.2f}, single-process / limit {single / r['limit']:.2f} (medians)"]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--card", default=str(CARD), help="the model card (default: the deploy stage's)")
    ap.add_argument("--n", type=int, default=2000, help="images to generate from the shipped photos")
    ap.add_argument("--repeats", type=int, default=3, help="alternated single-process and Ray Data jobs")
    ap.add_argument("--work", help="a folder to keep the images and outputs in (default: a temporary one)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="serve params to override")
    args = ap.parse_args()
    p = load_section(Params, "serve")
    p = dataclasses.replace(p, **{k: int(v) for k, v in (s.split("=", 1) for s in args.set)})
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(report(run(args.card, args.n, p, work, args.repeats), p))


if __name__ == "__main__":
    cli(main)
