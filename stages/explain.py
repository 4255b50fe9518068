"""explain: why the PyTorch model gets val images wrong: Grad-CAM heatmaps of its errors and least confident
answers (the `grad-cam` package), its top losses and its most confused class pairs.

The val predictions are the model's own (the evaluate stage's inputs and transform); the loss needs every
class's probability, which evaluate's predictions.csv does not keep.
"""
import csv
import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from stages import presets  # noqa: E402
from stages.checkpoint import load_model  # noqa: E402
from stages.config import atomic_text, atomic_write, cli, load_section, parser, stage_device  # noqa: E402
from stages.loading import loader, predict  # noqa: E402
from stages.manifest import read_manifest  # noqa: E402

FIELDS = ["rank", "path", "actual", "predicted", "p_actual", "p_predicted", "loss", "cached"]


@dataclasses.dataclass(frozen=True)
class Params:
    batch_size: int = 32
    images: int = 16                   # val images in the Grad-CAM grid: errors first, then the least confident
    top_losses: int = 16               # rows of hardest.csv


def target_layer(body, size):
    """The body's last direct child that outputs a feature map (N, C, H, W): for timm's EfficientNets `bn2`
    (conv_head + BN + activation, the map global pooling averages), for torchvision's ResNets `layer4`."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.append(n) if torch.is_tensor(o) and o.dim() == 4
                                     else None) for n, m in body.named_children()]
    with torch.no_grad():
        body(torch.zeros(1, 3, size, size, device=next(body.parameters()).device))
    for h in hooks:
        h.remove()
    return seen[-1]


def hardest(rows, probs, labels, classes):
    """Every val row with its loss (-log p(actual)), the largest first."""
    loss = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1))
    out = [{"path": r["path"], "actual": classes[t], "predicted": classes[int(pr.argmax())],
            "p_actual": round(float(pr[t]), 4), "p_predicted": round(float(pr.max()), 4),
            "loss": round(float(l), 4), "cached": r["cached"]}
           for r, t, pr, l in zip(rows, labels.tolist(), probs, loss)]
    out.sort(key=lambda r: -r["loss"])
    return [{"rank": k + 1, **r} for k, r in enumerate(out)]


def most_confused(ranked):
    """(actual, predicted, count) for each pair of classes the model confuses, the most frequent first."""
    pairs = Counter((r["actual"], r["predicted"]) for r in ranked if r["actual"] != r["predicted"])
    return [{"actual": a, "predicted": p, "count": n} for (a, p), n in pairs.most_common()]


def chosen(ranked, n):
    """Errors, worst loss first, then the correct answers with the lowest confidence: `n` rows in all."""
    wrong = [r for r in ranked if r["actual"] != r["predicted"]]
    unsure = sorted((r for r in ranked if r["actual"] == r["predicted"]), key=lambda r: r["p_predicted"])
    return (wrong + unsure)[:n]


def grad_cam(model, pp, picks, classes, layer, device):
    """(RGB crops in [0, 1], Grad-CAM overlays as uint8) of `picks` at the body's `layer`, each for the class
    the model predicted."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    tf = presets.eval_transform(pp)
    x = torch.stack([tf(presets.load_rgb(r["cached"] or r["path"])) for r in picks]).to(device)
    with GradCAM(model=model, target_layers=[model.body.get_submodule(layer)]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(classes.index(r["predicted"])) for r in picks])
    mean, std = torch.tensor(pp.mean)[:, None, None], torch.tensor(pp.std)[:, None, None]
    rgb = (x.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float32)
    return rgb, [show_cam_on_image(im, m, use_rgb=True) for im, m in zip(rgb, maps)]


def draw_cams(picks, rgb, overlays, path):
    """Pairs of (image, heatmap) panels, four pairs a row, titled actual -> predicted and confidence."""
    cols = 8 if len(picks) > 2 else 2 * max(1, len(picks))
    rows = max(1, -(-2 * len(picks) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (r, im, ov) in enumerate(zip(picks, rgb, overlays)):
        a, b = axes.flat[2 * k], axes.flat[2 * k + 1]
        a.imshow(im)
        b.imshow(ov)
        mark = "WRONG" if r["actual"] != r["predicted"] else "right"
        a.set_title(f"{mark}: {r['actual']} -> {r['predicted']}", fontsize=7)
        b.set_title(f"p {r['p_predicted']:.2f}, loss {r['loss']:.2f}", fontsize=7)
    if not picks:
        axes[0, 0].text(0.5, 0.5, "no val images", ha="center", va="center")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def run(checkpoint, manifest, out_dir, p, device="cpu"):
    """Write gradcam.png, hardest.csv (every val image, largest loss first) and metrics.json."""
    t0 = time.perf_counter()
    model, classes, pp = load_model(checkpoint)
    model.to(device)
    rows, _ = read_manifest(manifest, {"val"})
    logits, labels = predict(model, loader(rows, classes, presets.eval_transform(pp), p.batch_size), device)
    ranked = hardest(rows, logits.softmax(1).numpy(), labels.numpy(), classes)
    picks, layer = chosen(ranked, p.images), target_layer(model.body, pp.input_size)
    rgb, overlays = grad_cam(model, pp, picks, classes, layer, device) if picks else ([], [])
    out = Path(out_dir)
    draw_cams(picks, rgb, overlays, out / "gradcam.png")

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            w.writeheader()
            w.writerows(ranked[:p.top_losses])
    atomic_write(out / "hardest.csv", write)
    metrics = {"val_images": len(rows), "misclassified": sum(r["actual"] != r["predicted"] for r in ranked),
               "most_confused": most_confused(ranked), "gradcam_images": [r["path"] for r in picks],
               "gradcam_layer": layer,
               "seconds": round(time.perf_counter() - t0, 1)}
    atomic_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def main():
    args = parser(__doc__, "--checkpoint", "--manifest", "--out").parse_args()
    m = run(args.checkpoint, args.manifest, args.out, load_section(Params, "explain"), stage_device("evaluate"))
    pairs = ", ".join(f"{c['actual']} as {c['predicted']} x{c['count']}" for c in m["most_confused"][:3])
    print(f"explain: {m['misclassified']} of {m['val_images']} val images wrong ({pairs or 'none confused'}); "
          f"Grad-CAM of {len(m['gradcam_images'])} at layer {m['gradcam_layer']}: {Path(args.out) / 'gradcam.png'}; "
          f"{m['seconds']} s")


if __name__ == "__main__":
    cli(main)
