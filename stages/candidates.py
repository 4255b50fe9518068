"""The deploy stage's candidates: every variant file built from the checkpoint, scored on val and timed.

PyTorch eager FP32 (the baseline), export's ONNX FP32 (the fallback), its static INT8, the pruned checkpoint as
ONNX FP32 and its INT8, and export's weights at each test size in `deploy.sizes` with its INT8. stages/deploy.py
chooses among them and ships one.
"""
import json
from pathlib import Path

import numpy as np
import onnx
import torch

from stages import loading, quantize, runtime, timing
from stages.checkpoint import load_checkpoint, load_model
from stages.export import parity, predict_onnx, to_onnx
from stages.loading import predict
from stages.scores import scores

BASELINE, FALLBACK = "pytorch_fp32", "onnx_fp32"


def score(logits, labels, ref, classes):
    """A variant's accuracy, per-class recall deltas and parity against the reference logits `ref`."""
    s, r = scores(logits.argmax(1), labels, classes), scores(ref.argmax(1), labels, classes)
    par = parity(ref, logits)
    return {"accuracy": s["accuracy"], "accuracy_drop": round(r["accuracy"] - s["accuracy"], 4),
            "agreement": par["top1_agreement"], "max_logit_diff": round(par["max_abs_logit_diff"], 6),
            **{f"recall_delta_{c}": round(s["per_class"][c]["recall"] - r["per_class"][c]["recall"], 4)
               for c in classes}}


def variants(checkpoint, onnx_path, pruned, work, cal_rows, hold_rows, p):
    """({name: file} of every variant, {INT8 name: its quantize.search record}). `onnx_fp32_<px>`: export's
    weights exported again at each of `p.sizes` test sizes (the centre crop's share unchanged), the size in its
    metadata's preprocessing; each INT8 is calibrated and checked on holdout at its FP32 source's size."""
    ckpt = load_checkpoint(checkpoint)
    model, classes, pp = load_model(ckpt)
    files, pps = {BASELINE: Path(checkpoint), FALLBACK: Path(onnx_path)}, {FALLBACK: pp}
    if pruned:
        pruned_ckpt = load_checkpoint(pruned)
        files["pruned_fp32"], pps["pruned_fp32"] = work / "pruned_fp32.onnx", pp
        to_onnx(load_model(pruned_ckpt)[0], classes, pp, files["pruned_fp32"],
                {"backbone": pruned_ckpt["backbone"], "params": json.dumps(pruned_ckpt["params"])})
    extra = {e.key: e.value for e in onnx.load(str(onnx_path)).metadata_props if e.key not in
             ("classes", "preprocessing")}
    for size in (s for s in p.sizes if s != pp.input_size):      # the checkpoint's own size is onnx_fp32
        n = f"{FALLBACK}_{size}"
        files[n], pps[n] = work / f"{n}.onnx", pp.at_size(size)
        to_onnx(model, classes, pps[n], files[n], extra)
    int8, decoded = {}, {}
    for src, q in [(n, source(n, inverse=True)) for n in pps]:
        if pps[src] not in decoded:
            decoded[pps[src]] = inputs(cal_rows, hold_rows, classes, pps[src], p.batch_size)
        files[q], int8[q] = quantize.search(q, files[src], work, cal_rows, *decoded[pps[src]], p)
    return files, int8


def source(name, inverse=False):
    """The FP32 variant an INT8 variant quantizes (`inverse`: the INT8 name of an FP32 variant)."""
    return name.replace("fp32", "int8") if inverse else name.replace("int8", "fp32")


def inputs(cal_rows, hold_rows, classes, pp, batch_size):
    """(calibration array, holdout batches) at preprocessing `pp`: what quantizing a file of that size reads."""
    return (torch.cat([x for x, _ in loading.tensors(cal_rows, classes, pp, batch_size)]).numpy(),
            loading.tensors(hold_rows, classes, pp, batch_size))


def measure(model, classes, pp, files, val_rows, p):
    """The variant table (scores on val against the PyTorch logits, each ONNX file at the input size in its
    metadata; timings from `timing.bench`) and the logits."""
    sessions = {n: runtime.session(f, p.threads) for n, f in files.items() if n != BASELINE}
    pps = {BASELINE: pp, **{n: runtime.metadata(s)[1] for n, s in sessions.items()}}
    val = {q: loading.tensors(val_rows, classes, q, p.batch_size) for q in set(pps.values())}
    before = torch.get_num_threads()
    torch.set_num_threads(p.threads)
    try:
        ref, labels = predict(model, val[pp], "cpu")
    finally:
        torch.set_num_threads(before)
    logits = {BASELINE: ref, **{n: predict_onnx(s, val[pps[n]])[0] for n, s in sessions.items()}}
    x = {n: val[q][0][0].numpy() for n, q in pps.items()}
    timed = timing.bench(files, {n: v[:1] for n, v in x.items()},
                         {n: np.resize(v, (p.batch_size, *v.shape[1:])) for n, v in x.items()}, p)
    base = timed[BASELINE]["latency_ms_p50"]
    table = {n: {**score(v, labels, ref, classes), "input_size": pps[n].input_size, **timed[n],
                 "speedup_b1": round(base / timed[n]["latency_ms_p50"], 2),
                 "speedup_fp32_q1": timing.paired_speedup(timed[n], timed[FALLBACK])[0],   # what `select` uses
                 "size_mb": round(files[n].stat().st_size / 2**20, 3)}
             for n, v in logits.items()}
    return table, logits
