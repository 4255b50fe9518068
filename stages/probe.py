"""The linear probe's arithmetic: a cross-validated logistic regression on body features, folded into the
model's Linear head, and the paired test that fine-tuning must pass to replace it. numpy, scikit-learn and
torch tensors only: no models, files or params here."""
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F


def fit_probe(x, y, c, balanced):
    """Multinomial logistic regression on centred features scaled by one number (scikit-learn's lbfgs), as a
    torch Linear's (weight, bias) on the raw features. One scale for all features, not one each: a
    near-constant feature scaled up would get a huge weight, and fine-tuning from that head diverges."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mu = x.mean(0)
    sigma = float(x.std(0).mean()) + 1e-12
    clf = LogisticRegression(C=c, max_iter=1000, class_weight="balanced" if balanced else None)
    with warnings.catch_warnings():     # the weakest regularisation on separable features may not converge
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit((x - mu) / sigma, y)
    w, b = clf.coef_, clf.intercept_
    if w.shape[0] == 1:                 # binary: one row of log-odds; as two logits with the same softmax
        w, b = np.vstack([-w / 2, w / 2]), np.array([-b[0] / 2, b[0] / 2])
    w = w / sigma
    return torch.tensor(w, dtype=torch.float), torch.tensor(b - w @ mu, dtype=torch.float)


def head_logits(x, weight, bias):
    """A fitted probe's logits for the features `x` (numpy rows), as a float tensor."""
    return torch.tensor(x, dtype=torch.float) @ weight.T + bias


def image_folds(image, labels, folds, seed):
    """Stratified, shuffled k-fold splits over whole images, a picture's views on one side: (a mask of the rows
    to fit, the images to score). Rows 0..n-1 are each image's plain view in image order (`labels` are theirs);
    the rows after them are further views of the same images, `image` naming whose each row is."""
    from sklearn.model_selection import StratifiedKFold

    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(labels, labels):
        yield np.isin(image, tr), te


def choose_c(x, y, image, p):
    """The probe's regularisation by stratified k-fold cross-validation over whole images (`image_folds`):
    out-of-fold accuracy on the images' plain views, then log-loss on ties. Returns (C, report)."""
    labels = y[:len(np.unique(image))]
    folds = min(p.lp_folds, np.bincount(labels).min())
    if folds < 2:
        return 1.0, {"lp_c": 1.0, "cv_folds": 0}
    scores = []
    for c in p.lp_cs:
        right, loss, per_fold = 0, 0.0, []
        for fit, te in image_folds(image, labels, folds, p.seed):
            w, b = fit_probe(x[fit], y[fit], c, p.balance != "none")
            out = head_logits(x[te], w, b)
            hits = (out.argmax(1).numpy() == labels[te])
            right, per_fold = right + hits.sum(), per_fold + [hits.mean()]
            loss += F.cross_entropy(out, torch.tensor(labels[te]), reduction="sum").item()
        scores.append((right / len(labels), -loss / len(labels), np.std(per_fold), c))
    acc, neg_loss, spread, c = max(scores)
    return c, {"lp_c": c, "cv_folds": int(folds), "cv_acc": round(float(acc), 4),
               "cv_acc_std": round(float(spread), 4), "cv_loss": round(-neg_loss, 4)}


def out_of_fold(x, y, c, folds, seed, balanced, per_row=False, image=None):
    """Logits [n, k] of every image's plain view from a probe fitted on the other folds' rows (`image_folds`, at
    least 2; `image` None: a row an image): what the probe says about images it never saw (the labels audit, the
    trust fit). `per_row`: each fold's C is c * rows / (rows it fits), so that its penalty weighs against each row
    as the probe's fitted on all rows does (scikit-learn's C multiplies the summed loss): fewer rows at the same C
    make a more strongly regularised, less confident probe, and a temperature fitted on its logits too low for the
    shipped one."""
    image = np.arange(len(y)) if image is None else image
    labels = y[:len(np.unique(image))]
    out = np.zeros((len(labels), int(y.max()) + 1), np.float32)
    for fit, te in image_folds(image, labels, max(2, min(folds, np.bincount(labels).min())), seed):
        out[te] = head_logits(x[te], *fit_probe(x[fit], y[fit], c * len(y) / fit.sum() if per_row else c,
                                                balanced)).numpy()
    return out


def set_head(head, weight, bias):
    linear = head[-1]
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)


def earned(ft_logits, probe_logits, labels, z):
    """Does fine-tuning beat the probe on holdout by more than `z` standard errors of the paired difference?

    Both score the same holdout images, so the difference in accuracy is (b - c) / n, with b images only the
    fine-tuned model gets right and c only the probe; its standard error is sqrt(b + c - (b - c)^2 / n) / n
    (the paired, McNemar-style estimate). 47 holdout images and z = 2: about 4 more right, net, are needed.
    Returns (kept: bool, the numbers)."""
    ft, pr = ft_logits.argmax(1) == labels, probe_logits.argmax(1) == labels
    n, b, c = len(labels), int((ft & ~pr).sum()), int((pr & ~ft).sum())
    diff, se = (b - c) / n, math.sqrt(max(b + c - (b - c) ** 2 / n, 0)) / n
    return diff > z * se, {"holdout_images": n, "ft_only_right": b, "probe_only_right": c,
                           "holdout_gain": round(diff, 4), "holdout_gain_se": round(se, 4), "margin_se": z}
