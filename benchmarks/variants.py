"""Part 3: the deploy variants of one checkpoint, built and measured by the deploy stage's own functions.

PyTorch eager FP32, ONNX FP32 (`stages.export`), its static INT8, the pruned checkpoint (`stages.prune`) as ONNX
FP32 and its INT8, and export's weights at each of `deploy.sizes` with its INT8 (`stages.candidates.variants`);
accuracy on val, file size, batch-1 latency p50/p99 and batch throughput (`stages.candidates.measure`: each
variant in a process of its own, interleaved by round) at each thread count.
"""
import dataclasses
from pathlib import Path

from benchmarks.timing import section, wall
from stages import candidates, deploy, export, prune, quantize
from stages.config import UserError
from stages.manifest import read_manifest
from stages.checkpoint import load_model

THREADS = (1, 2)
QUICK = {"deploy": dict(warmup=1, rounds=1, repeats=3, batch_repeats=1, batch_size=8, exclude_worst=0, sizes=()),
         "int8": dict(calibration_size=8), "prune": dict(epochs=0)}


def params(quick):
    """(deploy.Params, prune.Params) from params.yaml (the stages' defaults where a section is absent)."""
    if not quick:           # throughput at batch 32 whatever the deploy stage's own batch is
        return section(deploy.Params, "deploy", batch_size=32), section(prune.Params, "prune")
    dp = section(deploy.Params, "deploy", **QUICK["deploy"])
    dp = dataclasses.replace(dp, int8={**dp.int8, **QUICK["int8"]}, tries=dp.tries[:1])
    return dp, section(prune.Params, "prune", **QUICK["prune"])


def build(checkpoint, manifest, work, dp, pp_):
    """{variant: file} and the INT8 search records, as the deploy stage builds them (plus export and prune)."""
    work = Path(work)
    export.run(checkpoint, manifest, work / "export", section(export.Params, "export"))
    report, prune_s = wall(prune.run, checkpoint, manifest, work / "prune", pp_, "cpu")
    (hold, _), (train_rows, _) = (read_manifest(manifest, {s}) for s in ("holdout", "train"))
    n = max(quantize.settings(dp.int8, t).calibration_size for t in dp.tries)
    cal_rows = quantize.calibration_rows(train_rows, n, dp.seed)
    (work / "variants").mkdir(parents=True, exist_ok=True)
    (files, int8), build_s = wall(candidates.variants, checkpoint, work / "export" / "model.onnx",
                                  work / "prune" / "model.pt", work / "variants", cal_rows, hold, dp)
    return files, {"prune": {k: v for k, v in report.items() if k != "recovery"}, "prune_s": round(prune_s, 1),
                   "int8": {k: {"kept_try": v["kept_try"], "settings": v["settings"]} for k, v in int8.items()},
                   "quantize_s": round(build_s, 1)}


def run(checkpoint, manifest, work, quick):
    """Part 3's result, and the file the deploy rule would ship (what part 5 serves)."""
    dp, pp_ = params(quick)
    files, info = build(checkpoint, manifest, work, dp, pp_)
    model, classes, pp = load_model(checkpoint)
    rows, _ = read_manifest(manifest, {"val"})
    tables = {}
    for t in THREADS:
        tables[t], _ = candidates.measure(model, classes, pp, files, rows, dataclasses.replace(dp, threads=t))
        print(f"bench: deploy variants measured at {t} thread(s)")
    try:
        chosen, reasons = deploy.select(tables[dp.threads if dp.threads in tables else THREADS[-1]], dp.budget)
    except UserError as e:
        chosen, reasons = deploy.FALLBACK, {deploy.FALLBACK: f"deploy.select failed: {e}"}
    return {"threads": list(THREADS), "batch_size": dp.batch_size, "val_images": len(rows),
            "timing": {k: getattr(dp, k) for k in ("warmup", "rounds", "repeats", "batch_repeats")},
            "budget": dataclasses.asdict(dp.budget), "chosen": chosen, "reasons": reasons,
            "tables": {str(t): v for t, v in tables.items()}, **info}, files[chosen], chosen
