"""labels: images that seem filed under the wrong class, found by confident learning (cleanlab).

Out-of-sample class probabilities for every train and holdout image come from k-fold linear probes on the
frozen backbone's features (the ones train's probe uses: same backbone, weights and test-size transform; the
probe's C chosen by the same cross-validation), then `cleanlab.filter.find_label_issues`, twice: the list to
review holds every image the out-of-sample probe puts in another class (`predicted_neq_given`), worst first by
the probability of its given label; those `filter_by` (confident learning) also flags are marked `confident`.
Why two: confident learning estimates how many labels are wrong from the probe's probabilities, and the probe's
cross-validated regularisation makes them soft, so its count falls short: with 12 of the shipped data's 244
train/holdout labels flipped (ten draws, benchmarks/label_bench.py) it flagged 11-16 images and held 80 % of the
flips on average (58-92 %) in the top 24; the review list (17-27 images) held 93 % (75-100 %). Only confident
suspects are dropped or fail the stage: never on weak evidence.
Val is scored by the probe fitted on train + holdout and reported, never dropped. The rule `label_issue`
(keep | drop | fail, like prepare's rules) decides what train does with the confident train/holdout suspects:
`exclude.csv` lists the ones to leave out (empty unless `drop`).
"""
import csv
import dataclasses
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from stages import backbones, presets, train  # noqa: E402
from stages.config import UserError, atomic_text, atomic_write, cli, load_section, parser, stage_device  # noqa: E402
from stages.manifest import read_manifest  # noqa: E402
from stages.probe import choose_c, fit_probe, head_logits, out_of_fold  # noqa: E402

ACTIONS = ("keep", "drop", "fail")
FIELDS = ["rank", "path", "split", "label", "suggested", "label_quality", "suggested_p", "confident", "action",
          "cached"]


@dataclasses.dataclass(frozen=True)
class Params:
    label_issue: str = "keep"          # keep | drop | fail: what happens to train/holdout suspects
    filter_by: str = "prune_by_noise_rate"   # cleanlab's confident-learning filter: the `confident` suspects
    grid: int = 16                     # suspects drawn in suspects.png

    def __post_init__(self):
        if self.label_issue not in ACTIONS:
            raise UserError(f"labels.label_issue: '{self.label_issue}' is not one of {', '.join(ACTIONS)}")


def features(seen, val, classes, tp, device):
    """Frozen body features, the backbone built as train builds it (seed first): ((x, y, image) of `seen` under
    train's probe views; (x, y) of `val`'s plain view at test size)."""
    torch.manual_seed(tp.seed)
    model, pp = backbones.create(tp.backbone, tp.weights, len(classes), tp.dropout)
    model, pp = model.to(device), pp.at_size(tp.test_size)
    x, y, image = train.probe_features(model, seen, classes, tp, device, train.probe_views(pp, tp))
    plain = train.probe_features(model, val, classes, tp, device, [presets.eval_transform(pp)])[:2] if val else ()
    return (x, y, image), plain


def out_of_sample(x, y, image, tp):
    """(probabilities [images, k] from probes that never saw the image, C, report): k folds, C chosen like
    train's."""
    c, cv = choose_c(x, y, image, tp)
    logits = torch.from_numpy(out_of_fold(x, y, c, tp.lp_folds, tp.seed, tp.balance != "none", image=image))
    return logits.softmax(1).numpy().astype(np.float64), c, cv


def ranked_issues(y, probs, filter_by):
    """(indices of the images to review, worst first by the probability of the given label; whether `filter_by`
    flags each one): the images cleanlab's `predicted_neq_given` or `filter_by` flags (see the module's doc)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    if len(np.unique(y)) < 2 or np.bincount(y).min() < 2:
        return np.array([], dtype=int), np.array([], dtype=bool)
    confident = find_label_issues(y, probs, filter_by=filter_by, n_jobs=1)
    listed = np.flatnonzero(confident | find_label_issues(y, probs, filter_by="predicted_neq_given", n_jobs=1))
    order = listed[np.argsort(get_label_quality_scores(y, probs, method="self_confidence")[listed], kind="stable")]
    return order, confident[order]


def issue_rows(rows, y, probs, ranked, classes, action):
    """The list's rows; `action` (drop | keep | report) applies to the confident ones, the rest are kept."""
    idx, confident = ranked
    return [{"rank": k + 1, "path": rows[i]["path"], "split": rows[i]["split"], "label": classes[y[i]],
             "suggested": classes[int(probs[i].argmax())], "label_quality": round(float(probs[i, y[i]]), 4),
             "suggested_p": round(float(probs[i].max()), 4), "confident": "yes" if sure else "no",
             "action": action if sure or action == "report" else "keep", "cached": rows[i]["cached"]}
            for k, (i, sure) in enumerate(zip(idx, confident))]


def draw_grid(issues, path, n):
    """Thumbnails of the top `n` suspects: given -> suggested label and the probability of the given one."""
    top = issues[:n]
    cols = min(4, max(1, len(top)))
    rows = max(1, -(-len(top) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, top):
        ax.imshow(presets.load_rgb(r["cached"] or r["path"]))
        ax.set_title(f"{r['split']} #{r['rank']}: {r['label']} -> {r['suggested']}\n"
                     f"p(given) {r['label_quality']:.2f}{', confident' if r['confident'] == 'yes' else ''}", fontsize=8)
    if not top:
        axes[0, 0].text(0.5, 0.5, "no suspected label issues", ha="center", va="center")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def write_csv(path, rows, fields):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    atomic_write(path, write)


def run(manifest, out_dir, p, tp, device="cpu"):
    """Rank suspected mislabels; write issues.csv, exclude.csv, suspects.png and metrics.json."""
    t0 = time.perf_counter()
    seen, classes = read_manifest(manifest, {"train", "holdout"})
    val, _ = read_manifest(manifest, {"val"})
    (xs, y, image), plain = features(seen, val, classes, tp, device)
    probs, c, cv = out_of_sample(xs, y, image, tp)
    ys = y[:len(seen)]
    mine = ranked_issues(ys, probs, p.filter_by)
    sure = int(mine[1].sum())
    issues = issue_rows(seen, ys, probs, mine, classes, "drop" if p.label_issue == "drop" else "keep")
    if val:
        xv, yv = plain
        vprobs = head_logits(xv, *fit_probe(xs, y, c, tp.balance != "none")).softmax(1).numpy().astype(np.float64)
        issues += issue_rows(val, yv, vprobs, ranked_issues(yv, vprobs, p.filter_by), classes, "report")
    out = Path(out_dir)
    write_csv(out / "issues.csv", issues, FIELDS)
    write_csv(out / "exclude.csv", [r for r in issues if r["action"] == "drop"], ["path"])
    draw_grid(issues, out / "suspects.png", p.grid)
    metrics = {"rule": p.label_issue, "train_holdout_images": len(seen), "suspects": len(mine[0]),
               "confident": sure, "filter_by": p.filter_by,
               "dropped": sum(r["action"] == "drop" for r in issues), "val_images": len(val),
               "val_suspects": len(issues) - len(mine[0]), "lp_c": c,
               "oof_accuracy": round(float((probs.argmax(1) == ys).mean()), 4), "cv_folds": cv["cv_folds"],
               "seconds": round(time.perf_counter() - t0, 1)}
    atomic_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if p.label_issue == "fail" and sure:
        raise UserError(f"{sure} train/holdout image(s) look mislabelled (labels.label_issue: fail): "
                        f"see {out / 'issues.csv'} and {out / 'suspects.png'}")
    return metrics, issues


def main():
    args = parser(__doc__, "--manifest", "--out").parse_args()
    metrics, issues = run(args.manifest, args.out, load_section(Params, "labels"),
                          load_section(train.Params, "train"), stage_device("train"))
    print(f"labels: {metrics['suspects']} suspected mislabels of {metrics['train_holdout_images']} train/holdout "
          f"images, {metrics['confident']} of them confident ({metrics['filter_by']}; {metrics['dropped']} dropped, "
          f"rule {metrics['rule']}), {metrics['val_suspects']} of "
          f"{metrics['val_images']} in val; {metrics['seconds']} s; list: {Path(args.out) / 'issues.csv'}")
    for r in issues[:10]:
        print(f"  {r['split']} {r['path']}: filed as {r['label']}, looks like {r['suggested']} "
              f"(p {r['label_quality']:.2f}{', confident' if r['confident'] == 'yes' else ''})")


if __name__ == "__main__":
    cli(main)
