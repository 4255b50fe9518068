"""trust: how far the shipped model's answers can be trusted, on the untouched val split.

Calibration (ECE, NLL, Brier before and after the deploy stage's temperature; a reliability diagram), abstention
(a risk-coverage curve and the chosen threshold's point, with a Wilson interval), out-of-distribution detection
(AUROC of the shipped file's `ood_score` against generated inputs, beside the energy score's; and of the same KNN
distance, on PyTorch features, against a class left out), and robustness
(val accuracy under corruptions at 3 severities, relative to clean: PyTorch, the deploy model, and export's FP32
file beside its INT8, whichever ships). The fitted
values themselves come from the deploy model's metadata (`stages.trust`); nothing here is fitted on val.
"""
import csv
import dataclasses
import json

import numpy as np
import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from stages import ood, presets, probe, runtime, trust
from stages.checkpoint import load_checkpoint, load_model
from stages.config import UserError, atomic_dir, cli, load_section, parser
from stages.loading import loader
from stages.manifest import read_manifest
from stages.quantize import calibration_rows
from stages.train import Params as TrainParams, probe_features

# name -> (function of a float [0, 1] batch and a severity, the 3 severities, mild to strong); on the network's
# 256 px view, after the eval transform's resize and crop, so a severity means the same on every image size
CORRUPTIONS = {
    "gaussian_noise": (lambda x, s: TF.gaussian_noise(x, sigma=s, clip=True), (0.04, 0.08, 0.16)),
    "blur": (lambda x, s: TF.gaussian_blur(x, [2 * round(2 * s) + 1] * 2, [s, s]), (1.0, 2.0, 4.0)),
    "jpeg": (lambda x, s: TF.to_dtype(TF.jpeg(TF.to_dtype(x, torch.uint8, scale=True), s), torch.float32,
                                      scale=True), (30, 12, 5)),
    "brightness": (lambda x, s: TF.adjust_brightness(x, s), (1.3, 1.6, 2.0)),
    "contrast": (lambda x, s: TF.adjust_contrast(x, s), (0.6, 0.4, 0.2)),
    "pixelate": (lambda x, s: TF.resize(TF.resize(x, [round(x.shape[-1] * s)] * 2, antialias=True),
                                        list(x.shape[-2:]), T.InterpolationMode.NEAREST), (0.5, 0.3, 0.15)),
}
SYNTHETIC = ("noise", "flat", "gradient", "tiny")


@dataclasses.dataclass(frozen=True)
class Params:
    batch_size: int = 32
    threads: int = 2                   # ONNX Runtime and PyTorch intra-op threads
    bins: int = 10                     # confidence bins of the ECE and the reliability diagram
    synthetic_images: int = 16         # generated out-of-distribution images per kind (SYNTHETIC)
    corruption_images: int = 64        # val images (stratified, seeded) each corruption is applied to; 0: all
    seed: int = 0


def synthetic(n, seed):
    """{kind: [PIL images]}: noise, flat colours, gradients and tiny images (2-8 px) that preprocessing scales
    up, in random sizes: none is an image of any class."""
    from PIL import Image
    rng, out = np.random.default_rng(seed), {k: [] for k in SYNTHETIC}
    for _ in range(n):
        w, h = rng.integers(32, 640, 2)
        out["noise"].append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out["flat"].append(np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (h, w, 3)))
        a, b, t = rng.integers(0, 256, 3), rng.integers(0, 256, 3), np.linspace(0, 1, w)[None, :, None]
        out["gradient"].append(np.broadcast_to(a + (b - a) * t, (h, w, 3)).astype(np.uint8))
        out["tiny"].append(rng.integers(0, 256, (*rng.integers(2, 9, 2), 3), dtype=np.uint8))
    return {k: [Image.fromarray(np.ascontiguousarray(a)) for a in v] for k, v in out.items()}


def onnx_out(sess, x, batch_size):
    """(logits, OOD scores (n,) or None for a file without the output) of the ONNX file over `x`."""
    names = [o.name for o in sess.get_outputs()]
    want = names[:1] + [runtime.OOD] * (runtime.OOD in names)
    outs = [sess.run(want, {runtime.INPUT: x[i:i + batch_size].numpy()}) for i in range(0, len(x), batch_size)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])[:, 0] if len(want) > 1 else None


def onnx_logits(sess, x, batch_size):
    return onnx_out(sess, x, batch_size)[0]


def torch_out(model, x, batch_size):
    """(features, logits) of the PyTorch model: one pass through the body, then the head. Channels-last
    (model and batches): eager convolutions on the CPU run 1.8x faster so (Lite0 at 256 px, 2 threads: 29
    against 51 ms an image, Intel Xeon AVX-512), and the corruption table is this stage's main cost."""
    model = model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        f = torch.cat([model.body(x[i:i + batch_size].contiguous(memory_format=torch.channels_last))
                       for i in range(0, len(x), batch_size)])
        return f, model.head(f)


def calibration(logits, labels, t, bins):
    """ECE (torchmetrics, L1, `bins` equal-width bins), NLL and Brier score at temperature 1 and `t`."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    out = {}
    for name, temp in (("before", 1.0), ("after", t)):
        p = trust.probabilities(logits, temp)
        ece = multiclass_calibration_error(torch.from_numpy(p), torch.from_numpy(labels), p.shape[1], bins)
        brier = ((p - np.eye(p.shape[1])[labels]) ** 2).sum(1).mean()
        out[name] = {"ece": round(float(ece), 4), "nll": round(trust.nll(logits, labels, temp), 4),
                     "brier": round(float(brier), 4)}
    return out


def wilson(k, n):
    from scipy.stats import binomtest
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson") if n else None
    return [round(float(ci.low), 4), round(float(ci.high), 4)] if ci else [0.0, 1.0]


def abstention(logits, scores, labels, fitted, target):
    """The served decision on val: coverage, accuracy on the answered with its Wilson interval, and the
    risk-coverage curve (the k most confident images answered, k = 1..n)."""
    probs, reasons = trust.decide(logits, fitted, scores)
    right, answered = probs.argmax(1) == labels, np.array([r is None for r in reasons])
    k, n = int(right[answered].sum()), int(answered.sum())
    conf = probs.max(1)
    order = np.argsort(-conf, kind="stable")
    hits = np.cumsum(right[order])
    curve = [{"coverage": round((i + 1) / len(conf), 4), "risk": round(1 - hits[i] / (i + 1), 4),
              "threshold": round(float(conf[order[i]]), 6)} for i in range(len(conf))]
    ci = wilson(k, n)
    return {"val_images": len(labels), "answered": n, "coverage": round(n / len(labels), 4),
            "accuracy_answered": round(k / n, 4) if n else None, "accuracy_ci95": ci,
            "accuracy_all": round(float(right.mean()), 4), "target_accuracy": target,
            "target_within_ci": bool(ci[1] >= target),
            **{f"flagged_{r}": sum(x == r for x in reasons) for r in trust.REASONS}}, curve


def auroc(inside, outside):
    """AUROC of an outlier score (larger: more out-of-distribution), `outside` the positives."""
    from sklearn.metrics import roc_auc_score
    s = np.concatenate([inside, outside])
    return round(float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], s)), 4)


def left_out_class(train_f, train_y, val_f, val_y, classes, ckpt, k):
    """Per class: that class is the unknown. AUROC over val of the served score's KNN distance (PyTorch features)
    to the other classes' train features, and, with at least two classes left, of the energy of a probe fitted
    on them (train's C)."""
    out = {}
    for c in range(len(classes)):
        keep, unknown = train_y != c, val_y == c
        s = ood.knn_scores(train_f[keep], val_f, min(k, int(keep.sum())))
        row = {"knn_auroc": auroc(s[~unknown], s[unknown])}
        if len(classes) > 2:
            y = np.searchsorted(np.unique(train_y[keep]), train_y[keep])
            w, b = probe.fit_probe(train_f[keep].double().numpy(), y, ckpt["selection"].get("lp_c", 1.0), False)
            e = trust.energy(probe.head_logits(val_f.double().numpy(), w, b).numpy())
            row["energy_auroc"] = auroc(e[~unknown], e[unknown])
        out[classes[c]] = row
    return out


def corrupted_accuracy(model, x, sessions, labels, pp, p):
    """[{corruption, severity, pytorch, one column per `sessions` entry, each also relative to clean}] val
    accuracy, severity 0 the clean images: PyTorch on `x`, `sessions` {column: (ONNX Runtime session, its own
    val batch, at the file's input size)}. Each corruption is seeded alike for every column."""
    mean, std = torch.tensor(pp.mean).view(1, 3, 1, 1), torch.tensor(pp.std).view(1, 3, 1, 1)
    acc = lambda z: round(float((np.asarray(z).argmax(1) == labels).mean()), 4)  # noqa: E731
    views, rows = {"pytorch": (None, x), **sessions}, []
    for name, (fn, levels) in [("clean", (None, (0,)))] + list(CORRUPTIONS.items()):
        for i, s in enumerate(levels):
            row, seen = {"corruption": name, "severity": i + (fn is not None)}, {}
            for col, (sess, xv) in views.items():     # a (session, batch) in two columns runs once
                if (id(sess), id(xv)) not in seen:
                    torch.manual_seed(p.seed)
                    xc = xv if fn is None else (fn((xv * std + mean).clamp(0, 1), s) - mean) / std
                    seen[id(sess), id(xv)] = acc(torch_out(model, xc, p.batch_size)[1] if sess is None
                                                 else onnx_logits(sess, xc, p.batch_size))
                row[col] = seen[id(sess), id(xv)]
            rows.append(row)
    for r in rows:
        r.update({f"{m}_relative": round(r[m] / max(rows[0][m], 1e-9), 4) for m in views})
    return rows


def run(checkpoint, card_path, fp32, int8, manifest, out_dir, p):
    """Score the card's model and the checkpoint on val (and, under corruptions, export's ONNX `fp32` and the
    deploy stage's `int8` of it); write metrics.json, CSV tables and PNG plots."""
    from stages.card import read_card
    torch.set_num_threads(p.threads)
    card = read_card(card_path)
    ckpt = load_checkpoint(checkpoint)
    model, classes, pp = load_model(ckpt)
    sess = runtime.session(card["model"], p.threads)
    fitted = trust.Trust.from_metadata(sess.get_modelmeta().custom_metadata_map)
    val_rows, _ = read_manifest(manifest, {"val"})
    train_rows, _ = read_manifest(manifest, {"train"})
    if not val_rows or not train_rows:
        raise UserError(f"{manifest}: the trust stage needs images in the train and val splits")
    tf = presets.eval_transform(pp)
    x, y = (torch.cat(t) for t in zip(*loader(val_rows, classes, tf, p.batch_size)))
    labels = y.numpy()
    val_f, pt_logits = torch_out(model, x, p.batch_size)
    dep_pp = runtime.metadata(sess)[1]                # a deploy variant may test at a size of its own
    tf_dep = presets.eval_transform(dep_pp)
    x_dep = x if dep_pp == pp else torch.cat([b for b, _ in loader(val_rows, classes, tf_dep, p.batch_size)])
    logits, s_val = onnx_out(sess, x_dep, p.batch_size)
    if s_val is None:
        raise UserError(f"{card['model']} has no {runtime.OOD!r} output: re-run the deploy stage, which adds it")
    fit = card.get("trust", {})
    m = {"variant": card["variant"], "val_images": len(labels), **dataclasses.asdict(fitted),
         "calibration": calibration(logits, labels, fitted.temperature, p.bins),
         "pytorch_vs_deploy_max_prob_diff": round(float(np.abs(
             trust.probabilities(pt_logits.numpy(), fitted.temperature)
             - trust.probabilities(logits, fitted.temperature)).max()), 6) if dep_pp == pp else None}
    m["abstention"], curve = abstention(logits, s_val, labels, fitted, fit.get("fit", {}).get("target_accuracy"))
    syn = synthetic(p.synthetic_images, p.seed)
    syn_x = {k: torch.stack([tf_dep(im) for im in v]) for k, v in syn.items()}
    out_syn = {k: onnx_out(sess, v, p.batch_size) for k, v in syn_x.items()}
    s_syn = {k: s for k, (_, s) in out_syn.items()}
    e_val = trust.energy(logits, fitted.temperature)
    e_syn = np.concatenate([trust.energy(z, fitted.temperature) for z, _ in out_syn.values()])
    reasons = {k: trust.decide(z, fitted, s)[1] for k, (z, s) in out_syn.items()}
    train_f, train_y = probe_features(model, train_rows, classes, TrainParams(batch_size=p.batch_size), "cpu", [tf])[:2]
    m["ood"] = {"synthetic_images": sum(len(v) for v in syn.values()),
                "synthetic_auroc": auroc(s_val, np.concatenate(list(s_syn.values()))),
                **{f"synthetic_auroc_{k}": auroc(s_val, v) for k, v in s_syn.items()},
                "synthetic_energy_auroc": auroc(e_val, e_syn),
                **{f"synthetic_flagged_ood_{k}": round(float(np.mean([r == trust.REASONS[0] for r in v])), 4)
                   for k, v in reasons.items()},
                "synthetic_abstained": round(float(np.mean([r is not None for v in reasons.values() for r in v])), 4),
                "val_flagged_ood": round(float(np.mean(s_val > fitted.ood_above)), 4),
                "left_out_class": left_out_class(torch.from_numpy(train_f).float(), train_y, val_f, labels, classes,
                                                 ckpt, fit.get("fit", {}).get("ood_k", trust.Targets.ood_k))}
    keep = corruption_subset(val_rows, p)
    cols = {"onnx_fp32": (runtime.session(fp32, p.threads), x[keep]),
            "onnx_int8": (runtime.session(int8, p.threads), x[keep])}
    cols["deploy"] = cols.get(card["variant"], (sess, x_dep[keep]))   # the shipped file's logits are its source's
    table = corrupted_accuracy(model, x[keep], cols, labels[keep], pp, p)
    m["robustness"] = robustness_summary(table, card["variant"], len(keep))
    write(out_dir, m, curve, table, logits, labels, fitted, p.bins, s_val, s_syn)
    return m


def corruption_subset(val_rows, p):
    """Indices of the val rows the corruptions run on: a stratified, seeded sample (quantize's), or all."""
    if not p.corruption_images or p.corruption_images >= len(val_rows):
        return np.arange(len(val_rows))
    picked = {r["sha256"] for r in calibration_rows(val_rows, p.corruption_images, p.seed)}
    return np.array([i for i, r in enumerate(val_rows) if r["sha256"] in picked])


def robustness_summary(table, variant, n):
    """Mean relative accuracy over every corruption and severity per model; the deploy model's accuracy against
    PyTorch's and export's INT8 against its FP32 (mean difference, overall and per corruption)."""
    bad = [r for r in table if r["severity"]]
    cols = [c for c in table[0] if c not in ("corruption", "severity") and not c.endswith("_relative")]
    diff = lambda a, b, rows=bad: round(float(np.mean([r[a] - r[b] for r in rows])), 4) + 0.0  # no -0.0  # noqa: E731
    return {"images": n, **{f"mean_relative_{c}": round(float(np.mean([r[f"{c}_relative"] for r in bad])), 4)
                            for c in cols},
            "deploy_minus_pytorch": diff("deploy", "pytorch"), "int8_minus_fp32": diff("onnx_int8", "onnx_fp32"),
            **{f"int8_minus_fp32_{c}": diff("onnx_int8", "onnx_fp32", [r for r in bad if r["corruption"] == c])
               for c in CORRUPTIONS},
            "deploy_is_int8": "int8" in variant,
            **{f"{r['corruption']}_{r['severity']}_{mdl}": r[mdl] for r in table for mdl in ("pytorch", "deploy")}}


def write(out_dir, m, curve, table, logits, labels, fitted, bins, s_val, s_syn):
    from stages import trust_plots
    with atomic_dir(out_dir) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
        for name, rows in (("risk_coverage.csv", curve), ("corruptions.csv", table)):
            with open(tmp / name, "w", newline="") as f:
                w = csv.DictWriter(f, list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        trust_plots.reliability(logits, labels, fitted.temperature, bins, m["calibration"], tmp / "reliability.png")
        trust_plots.risk_coverage(curve, m["abstention"], tmp / "risk_coverage.png")
        trust_plots.ood_histogram(s_val, s_syn, fitted.ood_above, m["ood"], tmp / "ood_score.png")
        trust_plots.corruptions(table, m["variant"], tmp / "corruptions.png")


def main():
    args = parser(__doc__, "--checkpoint", "--card", "--fp32", "--int8", "--manifest", "--out").parse_args()
    m = run(args.checkpoint, args.card, args.fp32, args.int8, args.manifest, args.out, load_section(Params, "trust"))
    c, a, o = m["calibration"], m["abstention"], m["ood"]
    print(f"trust: ECE {c['before']['ece']} -> {c['after']['ece']} (T {m['temperature']}); answered "
          f"{a['coverage']:.0%} of val at accuracy {a['accuracy_answered']} {a['accuracy_ci95']}; synthetic OOD "
          f"AUROC {o['synthetic_auroc']} (energy {o['synthetic_energy_auroc']}); corrupted accuracy "
          f"{m['robustness']['mean_relative_deploy']} of clean (INT8 minus FP32: "
          f"{m['robustness']['int8_minus_fp32']:+.4f})")


if __name__ == "__main__":
    cli(main)
