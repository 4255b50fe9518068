"""Benchmarks: the pipeline against the classic recipe and the usual alternatives, side by side, in one run on
this machine. Writes <out>/RESULTS.md, <out>/results.json and PNG plots; run from the project root:

    python -m benchmarks.run [--quick] [--out benchmarks] [--repeats N] [--train-repeats N]

Parts: 1 the train recipe against the classic tutorial loop, 2 transfer against from scratch, 3 deploy variants,
4 orchestration overhead, 5 serving. --quick runs the same code on a few images per class with tiny budgets:
it checks the harness, and its numbers mean nothing (2-3 min). The full run needs a quiet machine: 36 min on
2 cores (RESULTS.md), over a quarter of it the classic loop's 10 epochs.
"""
import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import onnxruntime
import torch

from benchmarks import overhead, recipes, report, serving, variants
from benchmarks.timing import section
from stages import prepare, train
from stages.config import cli
from stages.machine import cpu

MANIFEST = Path("outputs/prepare/manifest.csv")
BUDGETS = {   # classic loop epochs; repeats of parts 4 and 5; seconds per serving phase; files per folder
    "full": {"classic_epochs": 10, "overhead_repeats": 5, "serve_repeats": 3, "serve_seconds": 10.0,
             "per_folder": None, "train": {}},
    "quick": {"classic_epochs": 1, "overhead_repeats": 1, "serve_repeats": 1, "serve_seconds": 1.0,
              "per_folder": 4, "train": {"ft_epochs": 1}},
}


def machine():
    c = cpu()
    return {"cores": c["cores"], "cpu": c["model"], "cpu_flags": " ".join(c["flags"]), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
            **{k: importlib.metadata.version(k) for k in ("timm", "dvc", "prefect")},
            "loadavg_start": [round(v, 2) for v in os.getloadavg()]}


def subset(source, dest, n):
    """The first `n` files (by name) of every folder under `source`, copied with the same layout."""
    for folder in sorted({f.parent for f in Path(source).rglob("*") if f.is_file()}):
        for f in sorted(p for p in folder.iterdir() if p.is_file())[:n]:
            (Path(dest) / f.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, Path(dest) / f.relative_to(source))


def data(quick, work, per_folder):
    """(manifest parts 1-3 read, mini source folder or None): the pipeline's own manifest, brought up to date
    by DVC; with --quick a few images per class, prepared here by `stages.prepare.run`."""
    if not quick:
        overhead.sh(".", "dvc", "repro", "prepare", "validate")
        return MANIFEST, None
    p = section(prepare.Params, "prepare")
    src = (Path(work) / "mini").resolve()
    subset(p.source, src, per_folder)
    prepare.run(src, Path(work) / "prepare", dataclasses.replace(p, source=str(src)))
    return Path(work) / "prepare" / "manifest.csv", src


def step(results, key, fn, *args):
    """Run one part; record its result or its error, and how long it took. The result, or None."""
    print(f"bench: part '{key}' starting", flush=True)
    t = time.perf_counter()
    try:
        out = fn(*args)
        value = out[0] if isinstance(out, tuple) else out
    except Exception as e:
        out, value = None, {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        print(f"bench: part '{key}' FAILED: {value['error']}", file=sys.stderr, flush=True)
    results["parts"][key] = {**value, "part_s": round(time.perf_counter() - t, 1)}
    return out


def skipped(results, key, why):
    results["parts"][key] = {"error": f"skipped: {why}", "part_s": 0.0}


def parts(results, quick, b, work, train_repeats, overhead_repeats):
    """Parts 1, 2, 3, 5, then 4, each recorded in `results`; a part that needs a failed one is skipped."""
    manifest, mini = data(quick, work, b["per_folder"])
    p = section(train.Params, "train", **b["train"])
    part4 = (step, results, "overhead", overhead.run, ".", work / "overhead",
             overhead_repeats or b["overhead_repeats"], mini)
    beside = threading.Thread(target=part4[0], args=part4[1:]) if quick else None
    if beside:      # with --quick, part 4 (mostly waiting on subprocesses) runs beside the others: no time counts
        beside.start()
    try:
        p1 = step(results, "train", recipes.compare, manifest, work / "train", p, b["classic_epochs"], train_repeats)
        p3 = None
        if p1:
            step(results, "scratch", recipes.scratch, manifest, work / "scratch", p, p1, train_repeats)
            p3 = step(results, "deploy", variants.run, Path(p1["checkpoint"]), manifest, work / "deploy", quick)
        else:
            skipped(results, "scratch", "part 1 failed")
            skipped(results, "deploy", "part 1 failed (no checkpoint)")
        if p3:
            step(results, "serving", serving.run, p3[1], p3[2], work / "serving", b["serve_seconds"],
                 b["serve_repeats"])
        else:
            skipped(results, "serving", "part 3 failed (no deploy model)")
    finally:
        if beside:
            beside.join()
    if not beside:  # last: its first `dvc repro` may rebuild the project's own pipeline before the timed repeats
        part4[0](*part4[1:])


def run(out, quick, command, overhead_repeats=None, train_repeats=1):
    """All five parts; writes results.json, RESULTS.md and the plots to `out`. The results dict."""
    b = BUDGETS["quick" if quick else "full"]
    t0 = time.perf_counter()
    results = {"quick": quick, "command": command, "date": datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"), "machine": machine(), "parts": {}}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        parts(results, quick, b, Path(tmp), train_repeats, overhead_repeats)
    results["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    results["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report.write(results, out)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets: checks the harness, numbers mean nothing")
    ap.add_argument("--out", default="benchmarks", help="folder for RESULTS.md, results.json and the plots")
    ap.add_argument("--repeats", type=int, help="repeats of part 4 (default: 5, or 1 with --quick)")
    ap.add_argument("--train-repeats", type=int, default=1, help="pairs of training runs in parts 1 and 2")
    args = ap.parse_args()
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:])
    results = run(args.out, args.quick, command.strip(), args.repeats, args.train_repeats)
    failed = [k for k, v in results["parts"].items() if "error" in v]
    print(f"bench: wrote {Path(args.out) / 'RESULTS.md'} in {results['seconds'] / 60:.1f} min"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    cli(main)
