"""Benchmark: train's images/s on 1 process against 2 Ray Train workers (CPU, gloo), side by side, and train's peak
memory at two sizes of a generated data set. Prints a markdown table and returns a dict; asserts nothing.

Throughput: one fine-tune epoch of `--backbone` (default the real Lite0 with its ImageNet weights) over
`--speed-images` generated photos, 1-process and 2-worker runs alternated `--repeats` times on the same manifest
(median shown). On 2 cores the two workers get 1 core (1 thread) each against the single process's 2 threads:
it measures DDP's cost here, or, on a loaded machine, how 2-thread OpenMP stalls; more cores or machines are
what a speed-up needs.

Memory: the whole stage (linear probe, one fine-tune epoch, selection) on `--sizes` generated images, each in a
fresh process (peak RSS of that process). The tiny `test_efficientnet` keeps it affordable on 2 cores: its
activations are small, so what grows with the images (rows, cached features, predictions, loader state) is what
the figure shows; a real backbone adds a fixed ~1.5 GB (Lite0's activations at batch 32) on top.

    python -m benchmarks.scale_train --speed-images 128 --repeats 3 --sizes 1000 5000
"""
import argparse
import dataclasses
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

from benchmarks.prepare_scale import make_folder
from stages.machine import describe


def prepared(root, n, side):
    from stages import prepare
    make_folder(root / "src", n, side)
    prepare.run(root / "src", root / "prepare", prepare.Params(source=str(root / "src")))
    return root / "prepare" / "manifest.csv"


def fine_tune_rate(manifest, out, p):
    from stages import train
    result = train.run(manifest, out, p, "cpu")
    row = [h for h in result["history"] if h["phase"] == "finetune"][-1]
    return {"workers": p.workers, "images_per_s": row["images_per_s"], "epoch_s": row["seconds"],
            "loader_wait_s": row["loader_wait_s"], "stage_s": result["seconds"]}


def peak_rss_mb(manifest, out, p):
    """Run in a fresh process: the stage, then this process's peak resident memory."""
    from stages import train
    train.run(manifest, out, p, "cpu")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speed-images", type=int, default=128)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--repeats", type=int, default=3, help="alternated 1- and 2-worker runs; the median is shown")
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 5000], help="images for the memory runs")
    args = ap.parse_args(argv)
    from stages import train
    from stages.cluster import ray_init

    out = {"cpu": describe(), "speed": [], "memory": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = prepared(tmp / "speed", args.speed_images, 320)
        p = train.Params(backbone=args.backbone, strategy="finetune", ft_epochs=1, batch_size=16, policy="none")
        ray_init(num_cpus=2)
        runs = {1: [], 2: []}
        for _ in range(args.repeats):           # alternated: a load that comes and goes hits both alike
            for w in (1, 2):
                runs[w].append(fine_tune_rate(manifest, tmp / f"speed{w}", dataclasses.replace(p, workers=w)))
        out["speed"] = [sorted(runs[w], key=lambda r: r["images_per_s"])[len(runs[w]) // 2] for w in (1, 2)]
        tiny = train.Params(backbone="test_efficientnet", weights="none", strategy="lp_ft", ft_epochs=1,
                            batch_size=32, policy="none")
        spawn = multiprocessing.get_context("spawn")
        for n in args.sizes:
            t0 = time.perf_counter()
            manifest = prepared(tmp / f"m{n}", n, 160)
            with spawn.Pool(1) as pool:
                mb = pool.apply(peak_rss_mb, (manifest, tmp / f"m{n}" / "train", tiny))
            out["memory"].append({"images": n, "peak_mb": round(mb), "seconds": round(time.perf_counter() - t0)})
    print(report(out, args))
    return out


def report(out, args):
    s1, s2 = out["speed"]
    lines = [f"CPU: {out['cpu']}", "",
             f"| train, 1 fine-tune epoch of {args.backbone} on {args.speed_images} images (median of "
             f"{args.repeats}, alternated) | images/s | epoch s | "
             "loader wait s | stage s |", "|---|---|---|---|---|"]
    lines += [f"| {s['workers']} {'process' if s['workers'] == 1 else 'Ray Train workers'} | {s['images_per_s']} | "
              f"{s['epoch_s']} | {s['loader_wait_s']} | {s['stage_s']} |" for s in out["speed"]]
    lines += [f"| ratio 2 workers / 1 (measured side by side) | {s2['images_per_s'] / s1['images_per_s']:.2f}x "
              "| | | |", "",
              "| train stage (test_efficientnet, lp_ft, 1 epoch), generated images | peak RSS MB | ratio |",
              "|---|---|---|"]
    base = out["memory"][0]["peak_mb"] if out["memory"] else 0
    lines += [f"| {m['images']:,} | {m['peak_mb']} | {m['peak_mb'] / base:.2f}x |" for m in out["memory"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
