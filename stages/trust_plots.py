"""The trust stage's figures: reliability diagram, risk-coverage curve, OOD energy histogram, corruption plot.
matplotlib and numpy only; each function writes one PNG to the path it is given."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stages import trust  # noqa: E402


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def reliability(logits, labels, temperature, bins, cal, path):
    """Accuracy against confidence per bin, before and after temperature scaling, bar width by share."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    edges = np.linspace(0, 1, bins + 1)
    for ax, (name, t) in zip(axes, (("before", 1.0), ("after", temperature))):
        p = trust.probabilities(logits, t)
        conf, right = p.max(1), p.argmax(1) == labels
        idx = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
        for b in range(bins):
            if (idx == b).any():
                ax.bar(edges[b], right[idx == b].mean(), width=1 / bins, align="edge", alpha=0.7,
                       edgecolor="k", color="C0")
                ax.plot(conf[idx == b].mean(), right[idx == b].mean(), "k.")
        ax.plot([0, 1], [0, 1], "--", c="grey", lw=1)
        ax.set(title=f"{name} (T={t:.3g}): ECE {cal[name]['ece']:.3f}, NLL {cal[name]['nll']:.3f}",
               xlabel="confidence (top probability)", xlim=(0, 1), ylim=(0, 1.02))
    axes[0].set_ylabel("val accuracy in the bin")
    _save(fig, path)


def risk_coverage(curve, point, path):
    """Selective risk against coverage on val, the served threshold's point with its 95 % interval."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([r["coverage"] for r in curve], [r["risk"] for r in curve], lw=1.5, label="val, most confident first")
    if point["answered"]:
        lo, hi = point["accuracy_ci95"]
        acc = point["accuracy_answered"]              # risk 1 - acc: its interval is [1 - hi, 1 - lo]
        ax.errorbar(point["coverage"], 1 - acc, yerr=[[hi - acc], [acc - lo]], fmt="r*", ms=12, capsize=4,
                    label=f"served threshold: {point['answered']}/{point['val_images']} answered")
    if point.get("target_accuracy"):
        ax.axhline(1 - point["target_accuracy"], ls="--", c="grey", lw=1, label="target risk")
    ax.set(xlabel="coverage (share of val answered)", ylabel="risk (error rate of the answered)",
           xlim=(0, 1.02), ylim=(0, None), title="risk-coverage")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def ood_histogram(s_val, s_syn, threshold, ood, path):
    """The served OOD score of val images and of each generated kind, and its threshold."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    values = [s_val, *s_syn.values()]
    lo, hi = min(v.min() for v in values), max(v.max() for v in values)
    edges = np.linspace(lo, hi + 1e-9, 40)
    ax.hist(s_val, edges, alpha=0.6, label="val (in distribution)", density=True)
    for k, v in s_syn.items():
        ax.hist(v, edges, histtype="step", lw=1.5, label=f"{k} (AUROC {ood[f'synthetic_auroc_{k}']:.2f})",
                density=True)
    if np.isfinite(threshold):
        ax.axvline(threshold, c="r", ls="--", label="OOD threshold")
    ax.set(xlabel="ood_score: distance to the k-th nearest train feature (larger: more out-of-distribution)",
           ylabel="density", title=f"out-of-distribution: AUROC {ood['synthetic_auroc']:.3f} "
                                   f"(energy {ood['synthetic_energy_auroc']:.3f})")
    ax.legend(fontsize=7)
    _save(fig, path)


def corruptions(table, variant, path):
    """Accuracy relative to clean per corruption and severity: PyTorch, export's FP32 file and its INT8, and
    the deploy model where it is neither (a pruned variant)."""
    names = [n for n in dict.fromkeys(r["corruption"] for r in table) if n != "clean"]
    fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names), 3.2), sharey=True)
    labels = {"pytorch": "PyTorch FP32", "onnx_fp32": "onnx_fp32", "onnx_int8": "onnx_int8"}
    labels[variant if variant in labels else "deploy"] = f"{variant} (shipped)"
    for ax, n in zip(np.atleast_1d(axes), names):
        rows = [table[0]] + [r for r in table if r["corruption"] == n]
        for mdl, label in labels.items():
            ax.plot([r["severity"] for r in rows], [r[f"{mdl}_relative"] for r in rows], "o" + "-:"[mdl == "pytorch"],
                    label=label, zorder=3 * (mdl == "pytorch"))     # dotted, on top: ONNX FP32 often coincides
        ax.set(title=n, xlabel="severity", xticks=[0, 1, 2, 3])
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("val accuracy / clean")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    _save(fig, path)
