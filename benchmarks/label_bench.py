"""Label issues on real data: does the labels stage find images filed under the wrong class?

On a prepared manifest (the shipped data's, outputs/prepare/manifest.csv), `fraction` of the train + holdout
images get another class's label on purpose (seeded); the frozen features are computed once and the labels
stage's own core (k-fold probes, cleanlab) ranks the suspects, for the labels as given and as flipped. Reports
the suspects on the data as shipped and how many flipped images land in the top 2 x `fraction` of the list.
Not part of `make bench`:  python -m benchmarks.label_bench --manifest outputs/prepare/manifest.csv
"""
import argparse
import json
import os
import time

import numpy as np
from cleanlab.rank import get_label_quality_scores

from stages import labels, train
from stages.config import load_section
from stages.machine import describe
from stages.manifest import read_manifest




def recovery(x, y, n_classes, tp, lp, fraction, seed):
    """Flip `fraction` of `y` to another class (seeded); how many flipped rows the top 2 x fraction holds."""
    rng = np.random.default_rng(seed)
    flip = rng.choice(len(y), max(1, round(fraction * len(y))), replace=False)
    noisy = y.copy()
    noisy[flip] = (y[flip] + rng.integers(1, n_classes, len(flip))) % n_classes     # another class
    probs, _, _ = labels.out_of_sample(x, noisy, tp)
    ranked, confident = labels.ranked_issues(noisy, probs, lp.filter_by)
    hits = lambda idx: len(set(idx[:2 * len(flip)].tolist()) & set(flip.tolist()))
    # every image ranked by the same score, no cut-off: is a missed flip just below the list?
    worst = np.argsort(get_label_quality_scores(noisy, probs, method="self_confidence"), kind="stable")
    return {"seed": seed, "flipped": len(flip), "listed": len(ranked), "confident": int(confident.sum()),
            "recovered_in_top_2x": hits(ranked), "recovery": round(hits(ranked) / len(flip), 3),
            "recovery_confident_only": round(hits(ranked[confident]) / len(flip), 3),
            "recovery_full_ranking": round(hits(worst) / len(flip), 3)}


def flipped_recovery(manifest, tp, lp, fraction=0.05, seeds=(0,), device="cpu"):
    """{suspects as shipped, per seed: flipped, recovered in the top 2 x fraction; seconds}."""
    rows, classes = read_manifest(manifest, {"train", "holdout"})
    t0 = time.perf_counter()
    x, y = labels.features(rows, classes, tp, device)
    t_feat = time.perf_counter() - t0
    probs, c, _ = labels.out_of_sample(x, y, tp)
    shipped = labels.issue_rows(rows, y, probs, labels.ranked_issues(y, probs, lp.filter_by), classes, "keep")
    t1 = time.perf_counter()
    runs = [recovery(x, y, len(classes), tp, lp, fraction, s) for s in seeds]
    return {"images": len(y), "lp_c": c, "suspects_as_shipped": [
                {k: r[k] for k in ("path", "split", "label", "suggested", "label_quality", "confident")}
                for r in shipped],
            "runs": runs, "mean_recovery": round(float(np.mean([r["recovery"] for r in runs])), 3),
            "min_recovery": min(r["recovery"] for r in runs),
            "mean_recovery_confident_only": round(float(np.mean([r["recovery_confident_only"] for r in runs])), 3),
            "min_recovery_confident_only": min(r["recovery_confident_only"] for r in runs),
            "mean_recovery_full_ranking": round(float(np.mean([r["recovery_full_ranking"] for r in runs])), 3),
            "features_s": round(t_feat, 1),
            "probes_and_cleanlab_s_per_seed": round((time.perf_counter() - t1) / len(seeds), 1), "cpu": describe(),
            "loadavg": [round(v, 1) for v in os.getloadavg()]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default="outputs/prepare/manifest.csv")
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, default=10, help="flips drawn, each with its own seed")
    args = ap.parse_args()
    result = flipped_recovery(args.manifest, load_section(train.Params, "train"),
                              load_section(labels.Params, "labels"), args.fraction,
                              range(args.seeds))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
