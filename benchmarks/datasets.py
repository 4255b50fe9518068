"""Across data sets: the default train recipe against the simplest strong baseline, on every set there is.

For each folder under `--datasets` (default `../shared/datasets`; each is copied into a temporary folder first,
so nothing reads the original): `prepare` and `train` with params.yaml's sections (only `prepare.source`
changes), then val accuracy of the shipped model and of the frozen-feature logistic regression that train's
probe is (cross-validated on train + holdout, on the pretrained body). `validate` is not run: the point is the
recipe, and a set outside the data contract (trashnet's imbalance) would stop there.

`python -m benchmarks.datasets --out benchmarks` writes DATASETS.md and datasets.json, and the table into
RESULTS.md (`make bench` runs it first; benchmarks.run's report then includes it).
"""
import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from stages import backbones, presets, prepare, train
from stages.config import UserError, atomic_text, cli, load_section
from stages.evaluate import baseline_logits
from stages.scores import scores
from stages.machine import describe
from stages.checkpoint import load_model
from stages.manifest import read_manifest


def plain_baseline(manifest, tp):
    """What a user writes in ten lines, as the issue measured it: the pretrained body at its own size (resize,
    centre crop 224 for Lite0), features of train + holdout, scikit-learn's LogisticRegression as it comes."""
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(tp.seed)
    model, pp = backbones.create(tp.backbone, tp.weights, 2)
    fit, classes = read_manifest(manifest, {"train", "holdout"})
    val, _ = read_manifest(manifest, {"val"})
    (x, y), (vx, vy) = (train.predict(model.body, train.loader(r, classes, presets.eval_transform(pp),
                                                                tp.batch_size), "cpu") for r in (fit, val))
    clf = LogisticRegression(max_iter=5000).fit(x.numpy(), y.numpy())
    return round(float((clf.predict(vx.numpy()) == vy.numpy()).mean()), 4)


def one(source, work, pp_params, tp):
    """prepare + train on a copy of `source`; val accuracy of the shipped model and of the baseline."""
    copy = Path(shutil.copytree(source, work / source.name / "data"))
    manifest = work / source.name / "prepare" / "manifest.csv"
    prepare.run(copy, manifest.parent, dataclasses.replace(pp_params, source=str(copy)))
    t0 = time.perf_counter()
    result = train.run(manifest, work / source.name / "train", tp)
    seconds = time.perf_counter() - t0
    model, classes, pp = load_model(work / source.name / "train" / "model.pt")
    rows, _ = read_manifest(manifest, {"val"})
    batches = train.loader(rows, classes, presets.eval_transform(pp), tp.batch_size)
    logits, labels = train.predict(model, batches, "cpu")
    ckpt = torch.load(work / source.name / "train" / "model.pt", map_location="cpu", weights_only=True)
    base = baseline_logits(ckpt, batches, "cpu", logits)
    counts = {s: len(read_manifest(manifest, {s})[0]) for s in ("train", "holdout", "val")}
    acc, base_acc = (scores(x.argmax(1), labels, classes)["accuracy"] for x in (logits, base))
    sel, plain = result["selection"], plain_baseline(manifest, tp)
    return {"dataset": source.name, "classes": len(classes), **counts, "pipeline_val": acc,
            "baseline_val": base_acc, "gap": round(acc - base_acc, 4), "plain_baseline_val": plain,
            "gap_plain": round(acc - plain, 4), "kept": sel["kept"],
            "why": sel.get("why", ""), "cv_acc": sel.get("cv_acc"), "cv_acc_std": sel.get("cv_acc_std"),
            "lp_c": sel.get("lp_c"), "train_seconds": round(seconds, 1)}


def table(rows, machine):
    lines = [f"# The default recipe across data sets ({machine})", "",
             "Val accuracy of the shipped model (`train` with params.yaml's defaults) against two baselines on the "
             "same manifest: train's own probe (the frozen-feature logistic regression, cross-validated, at "
             "`test_size`) and the ten-line one a user would write (scikit-learn's LogisticRegression as it comes "
             "on the pretrained body's features at its own input size). Gaps are pipeline minus baseline.", "",
             "| data set | classes | train / holdout / val | pipeline val | probe baseline | gap | ten-line baseline "
             "| gap | kept | probe CV accuracy | train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['classes']} | {r['train']} / {r['holdout']} / {r['val']} | "
                     f"{r['pipeline_val']:.4f} | {r['baseline_val']:.4f} | {r['gap']:+.4f} | "
                     f"{r['plain_baseline_val']:.4f} | {r['gap_plain']:+.4f} | {r['kept']} | "
                     f"{r['cv_acc']} +/- {r['cv_acc_std']} | {r['train_seconds']} |")
    if rows:
        mean, plain = (sum(r[k] for r in rows) / len(rows) for k in ("gap", "gap_plain"))
        lines += ["", f"Mean gap {mean:+.4f} to the probe (worst {min(r['gap'] for r in rows):+.4f}), "
                  f"{plain:+.4f} to the ten-line baseline (worst {min(r['gap_plain'] for r in rows):+.4f}).", "",
                  "Why each kept what it kept:", ""] + [f"- {r['dataset']}: {r['why'] or r['kept']}" for r in rows]
    return "\n".join(lines) + "\n"


def run(datasets, out, tp, pp_params):
    if not Path(datasets).is_dir():
        raise UserError(f"no data sets folder '{datasets}' (--datasets): run from the project root beside "
                        "../shared, or name the folder")
    sources = sorted(d for d in Path(datasets).iterdir() if d.is_dir())
    rows, machine = [], describe()
    with tempfile.TemporaryDirectory() as work:
        for source in sources:
            print(f"datasets: {source.name}", flush=True)
            rows.append(one(source, Path(work), pp_params, tp))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(out)
    atomic_text(out / "datasets.json", json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    atomic_text(out / "DATASETS.md", table(rows, machine))
    if (out / "results.json").exists():     # RESULTS.md carries the table too
        from benchmarks import report
        report.write(json.loads((out / "results.json").read_text()), out)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="../shared/datasets")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = run(args.datasets, args.out, load_section(train.Params, "train"),
               load_section(prepare.Params, "prepare"))
    print(table(rows, describe()))


if __name__ == "__main__":
    cli(main)
