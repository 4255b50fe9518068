"""evaluate: accuracy, per-class precision/recall/F1 and the confusion matrix on the untouched val split,
for the PyTorch checkpoint and for the ONNX model under ONNX Runtime.
"""
import csv
import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from stages import backbones, presets  # noqa: E402
from stages.checkpoint import load_checkpoint, load_model  # noqa: E402
from stages.config import atomic_text, atomic_write, cli, load_section, parser, stage_device  # noqa: E402
from stages.export import predict_onnx  # noqa: E402
from stages.loading import loader, predict  # noqa: E402
from stages.manifest import read_manifest  # noqa: E402
from stages.probe import set_head  # noqa: E402
from stages.runtime import session  # noqa: E402
from stages.scores import headline, scores  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Params:
    batch_size: int = 32


def plot_confusion(cm, classes, title, path):
    fig, ax = plt.subplots(figsize=(2 + 0.6 * len(classes), 1.6 + 0.6 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in zip([(i, j) for i in range(len(classes)) for j in range(len(classes))], sum(cm, [])):
        ax.text(j, i, v, ha="center", va="center", color="black" if v < max(sum(cm, [])) / 2 else "white")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def baseline_logits(ckpt, batches, device, shipped):
    """Val logits of the simplest strong baseline: logistic regression on the frozen pretrained body's
    features, the probe train fitted (and cross-validated) on train + holdout. `shipped` when it is the
    shipped model; None for a checkpoint without a probe (strategy finetune)."""
    if "baseline" not in ckpt:
        return None
    if ckpt["selection"]["kept"] == "linear_probe":
        return shipped
    torch.manual_seed(ckpt["params"]["seed"])       # as train built it: the same body for weights: none
    model, _ = backbones.create(ckpt["backbone"], ckpt["params"]["weights"], len(ckpt["classes"]), ckpt["dropout"])
    set_head(model.head, ckpt["baseline"]["weight"], ckpt["baseline"]["bias"])
    return predict(model.to(device), batches, device, "evaluate: baseline")[0]


def summary(m, classes):
    lines = headline(m) + [f"{'class':<20}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for c in classes:
        v = m["pytorch"]["per_class"][c]
        lines.append(f"{c:<20}{v['precision']:>10.4f}{v['recall']:>10.4f}{v['f1']:>10.4f}{v['support']:>10}")
    return "\n".join(lines) + "\n"


def run(checkpoint, onnx_path, manifest, out_dir, p, device="cpu"):
    """Score both models on val; write metrics.json, predictions.csv, confusion.png and summary.txt."""
    ckpt = load_checkpoint(checkpoint)
    model, classes, pp = load_model(ckpt)
    rows, _ = read_manifest(manifest, {"val"})
    batches = loader(rows, classes, presets.eval_transform(pp), p.batch_size)
    torch_logits, labels = predict(model.to(device), batches, device, "evaluate: PyTorch")
    onnx_logits, _ = predict_onnx(session(onnx_path), batches)
    tp, op = torch_logits.argmax(1), onnx_logits.argmax(1)
    metrics = {"val_images": len(rows), "pytorch": scores(tp, labels, classes),
               "onnx": scores(op, labels, classes), "onnx_agreement": round((tp == op).float().mean().item(), 4)}
    base = baseline_logits(ckpt, batches, device, torch_logits)
    if base is not None:
        b = scores(base.argmax(1), labels, classes)
        metrics["baseline"] = {"accuracy": b["accuracy"], "macro_f1": b["macro_f1"]}
        metrics["gap_to_baseline"] = round(metrics["pytorch"]["accuracy"] - b["accuracy"], 4)
    if "selection" in ckpt:
        metrics["selection"] = ckpt["selection"]
    out = Path(out_dir)
    atomic_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    probs = torch_logits.softmax(1)

    def write_predictions(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "actual", "predicted", "onnx_predicted", "confidence"])
            for r, t, o, pr in zip(rows, tp.tolist(), op.tolist(), probs):
                w.writerow([r["path"], r["label"], classes[t], classes[o], round(pr.max().item(), 4)])

    atomic_write(out / "predictions.csv", write_predictions)
    plot_confusion(metrics["pytorch"]["confusion"], classes,
                   f"val accuracy {metrics['pytorch']['accuracy']:.3f}", out / "confusion.png")
    wrong = [f"  {r['path']}: {r['label']} taken for {classes[t]}" for r, t in zip(rows, tp.tolist())
             if classes[t] != r["label"]]
    text = summary(metrics, classes) + (f"misclassified ({len(wrong)}):\n" + "\n".join(wrong) + "\n" if wrong else "")
    atomic_text(out / "summary.txt", text)
    return metrics, text


def main():
    args = parser(__doc__, "--checkpoint", "--onnx", "--manifest", "--out").parse_args()
    _, text = run(args.checkpoint, args.onnx, args.manifest, args.out, load_section(Params, "evaluate"),
                  stage_device("evaluate"))
    print(text, end="")


if __name__ == "__main__":
    cli(main)
