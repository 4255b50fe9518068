"""Scores of predictions against labels, and the lines that state them: one source for evaluate's summary.txt and
the report page (torch-free: the report reads evaluate's metrics.json without a model)."""
import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def scores(pred, labels, classes):
    """Accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix (rows: truth), for
    predicted and true class indices (numpy arrays, torch tensors or lists)."""
    pred, labels, k = np.asarray(pred), np.asarray(labels), len(classes)
    cm = confusion_matrix(labels, pred, labels=range(k))
    prec, rec, f1, support = precision_recall_fscore_support(labels, pred, labels=range(k), zero_division=0)
    per_class = {c: {"precision": round(float(prec[i]), 4), "recall": round(float(rec[i]), 4),
                     "f1": round(float(f1[i]), 4), "support": int(support[i])} for i, c in enumerate(classes)}
    return {"accuracy": round(float(np.trace(cm)) / max(1, int(cm.sum())), 4),
            "macro_f1": round(sum(v["f1"] for v in per_class.values()) / k, 4),
            "per_class": per_class, "confusion": cm.tolist()}


def headline(m):
    """evaluate's metrics `m` as lines of text: val size, both runtimes' accuracy, the frozen-feature baseline and
    what train kept (the per-class table follows them in the summary and the report)."""
    lines = [f"val images: {m['val_images']}",
             f"accuracy  PyTorch {m['pytorch']['accuracy']:.4f}   ONNX Runtime {m['onnx']['accuracy']:.4f}   "
             f"(top-1 agreement {m['onnx_agreement']:.4f})   macro F1 {m['pytorch']['macro_f1']:.4f}"]
    if "baseline" in m:
        lines.append(f"baseline  frozen-feature logistic regression {m['baseline']['accuracy']:.4f}   "
                     f"gap {m['gap_to_baseline']:+.4f}")
    if "selection" in m:
        why = m["selection"].get("why")
        lines.append(f"kept      {m['selection']['kept']}" + (f": {why}" if why else ""))
    return lines
