"""Static INT8 (QDQ) quantization helpers for the deploy stage: settings, calibration sample, diagnosis.

On an AVX2 CPU without VNNI, ONNX Runtime's fast path is U8 activations with S8 weights, and `reduce_range`
(7-bit weights) avoids the saturation of its 8-bit dot products; per-channel U8U8 was 4x slower than FP32
here (see TRAPS.md). Calibration reads a class-stratified sample of the train split, never holdout or val.
"""
import dataclasses
import hashlib
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

from stages.config import UserError, typed
from stages.export import parity, predict_onnx
from stages.runtime import INPUT, session

TYPES = {"QInt8": QuantType.QInt8, "QUInt8": QuantType.QUInt8}
CALIBRATIONS = {"MinMax": CalibrationMethod.MinMax, "Entropy": CalibrationMethod.Entropy,
                "Percentile": CalibrationMethod.Percentile}


@dataclasses.dataclass(frozen=True)
class Settings:
    per_channel: bool = True
    reduce_range: bool = True          # 7-bit weights: no U8S8 saturation without VNNI
    activation_type: str = "QUInt8"    # QInt8 | QUInt8
    weight_type: str = "QInt8"
    calibrate_method: str = "MinMax"   # MinMax | Entropy | Percentile
    nodes_to_exclude: tuple = ()       # ONNX node names left in FP32
    calibration_size: int = 64         # train images, stratified by class
    preprocess: bool = True            # ONNX Runtime's quant_pre_process (shape inference, graph fusions) first

    def __post_init__(self):
        for key, allowed in (("activation_type", TYPES), ("weight_type", TYPES),
                             ("calibrate_method", CALIBRATIONS)):
            if getattr(self, key) not in allowed:
                raise UserError(f"deploy int8.{key} '{getattr(self, key)}' is not one of {', '.join(allowed)}")
        if self.calibration_size < 1:
            raise UserError(f"deploy int8.calibration_size must be >= 1, not {self.calibration_size}")
        object.__setattr__(self, "nodes_to_exclude", tuple(self.nodes_to_exclude))


def settings(*layers):
    """Settings from dicts applied in turn (the base, then one try's overrides); a misspelt key fails."""
    known = {f.name for f in dataclasses.fields(Settings)}
    merged = {}
    for layer in layers:
        for key in layer or {}:
            if key not in known:
                raise UserError(f"deploy: unknown INT8 setting '{key}'; known: {', '.join(sorted(known))}")
        merged.update(layer or {})
    return Settings(**typed(Settings, merged, "deploy.int8"))


def calibration_rows(rows, n, seed=0):
    """`n` rows taken round-robin over the classes (each class shuffled with `seed`): a stratified sample."""
    by_class = {}
    for r in sorted(rows, key=lambda r: r["sha256"]):
        by_class.setdefault(r["label"], []).append(r)
    rng = random.Random(seed)
    for group in by_class.values():
        rng.shuffle(group)
    picked, i = [], 0
    while len(picked) < min(n, len(rows)):
        for group in by_class.values():
            if i < len(group) and len(picked) < n:
                picked.append(group[i])
        i += 1
    return picked


def digest(rows):
    """SHA-256 of the calibration images' own SHA-256s, in the order read: names the calibration set."""
    return hashlib.sha256("\n".join(r["sha256"] for r in rows).encode()).hexdigest()


class Reader(CalibrationDataReader):
    """Feeds (n, 3, H, W) float32 arrays to the model's input (`runtime.INPUT`)."""

    def __init__(self, arrays, name=INPUT):
        self.items, self.name = iter(list(arrays)), name

    def get_next(self):
        x = next(self.items, None)
        return None if x is None else {self.name: x}


def prepared(fp32_path, tmp, s):
    """The model quantize_static reads: `fp32_path`, or its quant_pre_process'd copy in `tmp`."""
    if not s.preprocess:
        return Path(fp32_path)
    out = Path(tmp) / "prepared.onnx"
    quant_pre_process(str(fp32_path), str(out))
    return out


def quantize(fp32_path, out_path, arrays, s, cache=None):
    """Write the static QDQ INT8 model of `fp32_path`, calibrated on `arrays`, to `out_path`; with `cache`
    (a JSON file), calibration ranges are read from it when it exists and written to it otherwise."""
    with tempfile.TemporaryDirectory() as tmp:
        quantize_static(str(prepared(fp32_path, tmp, s)), str(out_path), Reader(arrays),
                        quant_format=QuantFormat.QDQ, per_channel=s.per_channel, reduce_range=s.reduce_range,
                        activation_type=TYPES[s.activation_type], weight_type=TYPES[s.weight_type],
                        calibrate_method=CALIBRATIONS[s.calibrate_method],
                        nodes_to_exclude=list(s.nodes_to_exclude) or None, calibration_cache_path=cache)
    m = onnx.load(str(out_path))              # quantize_static drops the metadata: class names, preprocessing
    del m.metadata_props[:]
    m.metadata_props.extend(onnx.load(str(fp32_path)).metadata_props)
    onnx.save(m, str(out_path))


def sqnr_db(ref, x):
    """Signal-to-noise ratio of logits `x` against `ref` in dB: 20 dB = errors a tenth of the logits' size."""
    return round(20 * math.log10(float(ref.norm()) / max(float((ref - x).norm()), 1e-12)), 2)


def trial(src, path, cal_x, s, hold_x, ref, threads, cache=None):
    """Quantize with `s` (calibrated on `cal_x`'s first images) and measure against the FP32 logits `ref` on
    the holdout batches `hold_x`."""
    n = min(s.calibration_size, len(cal_x))
    quantize(src, path, np.split(cal_x[:n], range(16, n, 16)), s, cache)
    logits = predict_onnx(session(path, threads), hold_x)[0]
    return {**{f"holdout_{k}": v for k, v in parity(ref, logits).items()},
            "holdout_logit_sqnr_db": sqnr_db(ref, logits)}


def scopes(path, max_groups=16):
    """Node names grouped by module scope ('/body/blocks/blocks.3'), as finely as `max_groups` allows."""
    names = [n.name for n in onnx.load(str(path)).graph.node]
    for depth in range(8, 0, -1):
        groups = {}
        for n in names:
            groups.setdefault("/".join(n.split("/")[:-1][:depth]) or n, []).append(n)
        if len(groups) <= max_groups:
            break
    return groups


def diagnose(src, work, cal_x, s, hold_x, threads, exclude=0, top=5):
    """Which layers break agreement: the INT8 model re-measured with each module scope left in FP32 in turn
    (calibrated once); the `top` scopes whose exclusion recovers the most logit SNR on holdout, best first,
    and the nodes of the worst `exclude` of them."""
    cache, path = work / "diagnose-calibration.json", work / "diagnose.onnx"
    cache.unlink(missing_ok=True)
    ref = predict_onnx(session(src, threads), hold_x)[0]
    base = trial(src, path, cal_x, s, hold_x, ref, threads, cache)
    with tempfile.TemporaryDirectory() as tmp:
        groups = scopes(prepared(src, tmp, s))
    rows = []
    for scope, nodes in groups.items():
        excluded = dataclasses.replace(s, nodes_to_exclude=s.nodes_to_exclude + tuple(nodes))
        r = trial(src, path, cal_x, excluded, hold_x, ref, threads, cache)
        rows.append({"scope": scope, "nodes": nodes, "holdout_top1_agreement": r["holdout_top1_agreement"],
                     "holdout_logit_sqnr_db": r["holdout_logit_sqnr_db"],
                     "gain_db": round(r["holdout_logit_sqnr_db"] - base["holdout_logit_sqnr_db"], 2)})
    rows.sort(key=lambda r: -r["gain_db"])
    worst = [{**r, "nodes": len(r["nodes"])} for r in rows[:max(top, exclude)]]
    return {"int8_all": base, "worst": worst, "exclude": [n for r in rows[:exclude] for n in r["nodes"]]}


def search(name, src, work, cal_rows, cal_x, hold_x, p):
    """Quantize `src` with `p.int8` updated by each of `p.tries` in turn, until one agrees with `src` on
    holdout to `p.budget.min_agreement`; if none does, diagnose the best and try it once more with its worst
    `p.exclude_worst` scopes left in FP32. (path of the best try, {kept try, settings, tries, diagnosis})."""
    ref = predict_onnx(session(src, p.threads), hold_x)[0]
    tries, log, best, diagnosis = list(p.tries), [], None, None
    for i in range(len(tries) + 1):
        if i < len(tries):
            s = settings(p.int8, tries[i])
        elif p.exclude_worst:             # every try failed: one more, the worst scopes left in FP32
            diagnosis = diagnose(src, work, cal_x, best[2], hold_x, p.threads, exclude=p.exclude_worst)
            s = dataclasses.replace(best[2], nodes_to_exclude=(*best[2].nodes_to_exclude, *diagnosis["exclude"]))
        else:
            break
        n, path, t0 = min(s.calibration_size, len(cal_rows)), work / f"{name}-try{i}.onnx", time.perf_counter()
        log.append({"try": i, "settings": dataclasses.asdict(s), "calibration_sha256": digest(cal_rows[:n]),
                    "calibration_images": n, **trial(src, path, cal_x, s, hold_x, ref, p.threads),
                    "seconds": round(time.perf_counter() - t0, 1)})
        print(f"deploy: {name} try {i}: holdout agreement {log[-1]['holdout_top1_agreement']:.4f}, logit SNR "
              f"{log[-1]['holdout_logit_sqnr_db']} dB ({tries[i] if i < len(tries) else 'worst scopes in FP32'})")
        key = (log[-1]["holdout_top1_agreement"], log[-1]["holdout_logit_sqnr_db"])
        if best is None or key > best[3]:
            best = (log[-1], path, s, key)
        if log[-1]["holdout_top1_agreement"] >= p.budget.min_agreement:
            break
    return best[1], {"kept_try": best[0]["try"], "calibration_sha256": best[0]["calibration_sha256"],
                     "settings": best[0]["settings"], "tries": log, "diagnosis": diagnosis}
