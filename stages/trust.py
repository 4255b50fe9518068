"""When not to trust an answer: temperature scaling, a confidence threshold and an out-of-distribution score.

The deploy stage fits `Trust` on held-out logits of the model it ships and writes it into the ONNX metadata and
the card (key "trust"); the server, batch prediction and the trust stage apply it through `probabilities` and
`decide`. A library module: numpy only at import (the serving image has no torch and no scipy); the fit imports
scipy where it runs.

Decisions, in this order: the file's `ood_score` output (stages/ood.py: distance to the k-th nearest train
feature) above `ood_above`, or not a number -> "out_of_distribution"; else the calibrated top probability below
`abstain_below` -> "low_confidence"; else answered. Files deployed before the score (2026-12) carry an energy
threshold instead, `ood_energy_above` on `-T * logsumexp(logits / T)`, which `decide` still applies.

With two classes a softmax head's logits sum to a constant (gradient descent on cross-entropy never changes
the sum of its weight rows, and train's binary probe writes them as +-w/2), so every logit score, energy
included, ranks inputs exactly as the top probability does: that is why the served score is in feature space.
"""
import dataclasses
import json

import numpy as np

REASONS = ("out_of_distribution", "low_confidence")
LOG_T_RANGE = (-4.0, 4.0)      # temperatures searched: e^-4 (0.018) to e^4 (55)


@dataclasses.dataclass(frozen=True)
class Targets:
    """deploy.trust in params.yaml: what the thresholds are chosen for, on held-out images."""
    target_accuracy: float = 0.99   # accuracy on the images answered (not abstained on)
    min_coverage: float = 0.5       # never abstain on more than 1 - this of held-out images to reach it
    ood_tpr: float = 0.95           # held-out (in-distribution) images that pass the OOD check
    ood_k: int = 5                  # the OOD score: distance to the k-th nearest bank feature
    ood_bank: int = 2048            # train images (stratified, seeded) in the bank: 4 bytes x feature width each

    def __post_init__(self):
        for k in ("target_accuracy", "min_coverage", "ood_tpr"):
            if not 0 < getattr(self, k) <= 1:
                raise ValueError(f"deploy.trust.{k} must be in (0, 1], not {getattr(self, k)}")
        if not (isinstance(self.ood_k, int) and isinstance(self.ood_bank, int) and 1 <= self.ood_k <= self.ood_bank):
            raise ValueError(f"deploy.trust.ood_k and ood_bank must be integers, 1 <= ood_k <= ood_bank, not "
                             f"{self.ood_k!r} and {self.ood_bank!r}")


@dataclasses.dataclass(frozen=True)
class Trust:
    """What travels in the model: temperature and thresholds. The defaults change nothing (plain softmax,
    never abstain): a model without the metadata behaves as it did before."""
    temperature: float = 1.0
    abstain_below: float = 0.0          # calibrated top probability under it: "low_confidence"
    ood_above: float = float("inf")     # the file's `ood_score` over it: "out_of_distribution"
    ood_energy_above: float = float("inf")   # energy over it: the same (files from before `ood_score`)

    def to_json(self):
        """Standard JSON: an infinite threshold (never flag) as null, which `from_metadata` reads back."""
        return json.dumps({k: v if np.isfinite(v) else None for k, v in dataclasses.asdict(self).items()})

    @classmethod
    def from_metadata(cls, meta):
        """From an ONNX file's metadata map (`custom_metadata_map`); absent: the defaults."""
        if "trust" not in meta:
            return cls()
        d = json.loads(meta["trust"])
        return cls(**{f.name: float(d[f.name]) for f in dataclasses.fields(cls) if d.get(f.name) is not None})


def log_softmax(logits, temperature=1.0):
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def probabilities(logits, temperature=1.0):
    """Softmax of logits / T, float64: what the server, batch prediction and the trust stage report."""
    return np.exp(log_softmax(logits, temperature))


def energy(logits, temperature=1.0):
    """-T * logsumexp(logits / T) per row (Liu et al. 2020; pytorch_ood's EnergyBased.score, which the tests
    compare it with): larger is more out-of-distribution. numpy, because the server has no torch."""
    z = np.asarray(logits, np.float64) / temperature
    m = z.max(-1)
    return -temperature * (m + np.log(np.exp(z - m[..., None]).sum(-1)))


def decide(logits, trust, ood_score=None):
    """(probabilities, reasons): reasons[i] is None for an answer, else one of REASONS. `ood_score`: the file's
    OOD output, (n, 1) or (n,); None for a file without one (then `ood_above` must be infinite)."""
    probs = probabilities(logits, trust.temperature)
    ood = energy(logits, trust.temperature) > trust.ood_energy_above
    if ood_score is not None:
        ood |= ~(np.asarray(ood_score, np.float64).reshape(len(probs)) <= trust.ood_above)   # NaN: flagged
    elif np.isfinite(trust.ood_above):
        raise ValueError("the trust settings have an ood_score threshold, but no ood_score was given")
    low = probs.max(-1) < trust.abstain_below
    return probs, [REASONS[0] if o else REASONS[1] if lo else None for o, lo in zip(ood, low)]


def nll(logits, labels, temperature=1.0):
    return float(-log_softmax(logits, temperature)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits, labels):
    """The T that minimises the mean NLL of `labels` under softmax(logits / T) (Guo et al. 2017). The NLL is
    convex in 1/T, so a bounded scalar search on log T finds the optimum; a library (netcal, a torch LBFGS loop)
    would do the same one-parameter search with more machinery."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels)
    r = minimize_scalar(lambda s: nll(logits, labels, np.exp(s)), bounds=LOG_T_RANGE, method="bounded",
                        options={"xatol": 1e-6})
    return float(np.exp(r.x))


def abstain_threshold(confidence, correct, target, min_coverage):
    """(threshold, info): the lowest calibrated confidence to answer at, so that the answered images (confidence
    >= threshold) are at least `target` accurate, answering as many as possible; never fewer than
    `min_coverage` of them (then the target is missed, and info says so). 0 when every image may be answered."""
    order = np.argsort(-np.asarray(confidence), kind="stable")
    conf, hits = np.asarray(confidence)[order], np.asarray(correct, bool)[order]
    n = len(conf)
    acc = np.cumsum(hits) / np.arange(1, n + 1)            # accuracy of the k most confident, k = 1..n
    cuts = [k for k in range(1, n + 1) if k == n or conf[k] < conf[k - 1]]   # no cut between equal confidences
    ok = [k for k in cuts if acc[k - 1] >= target]
    floor = int(np.ceil(min_coverage * n))
    k = max(ok) if ok and max(ok) >= floor else min(c for c in cuts if c >= floor)
    info = {"images": n, "coverage": round(k / n, 4), "accuracy": round(float(acc[k - 1]), 4),
            "target_met": bool(acc[k - 1] >= target)}
    return (0.0 if k == n else float(conf[k - 1])), info


def ood_threshold(scores, tpr):
    """The score at or under which a fraction `tpr` of in-distribution `scores` fall: flag what lies above."""
    return float(np.quantile(np.asarray(scores, np.float64), tpr, method="higher"))


def fit(logits, labels, targets, ood_scores=None):
    """(Trust, report) fitted on held-out logits (n, classes), labels (n,) and, for a file with the output,
    `ood_scores` (n,): without them, nothing is flagged out-of-distribution."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    # no error at all: the NLL falls as T -> 0, and the search would return its bound; nothing to fit on
    t = fit_temperature(logits, labels) if (logits.argmax(1) != labels).any() else 1.0
    probs = probabilities(logits, t)
    threshold, info = abstain_threshold(probs.max(1), probs.argmax(1) == labels, targets.target_accuracy,
                                        targets.min_coverage)
    ood = float("inf") if ood_scores is None else ood_threshold(ood_scores, targets.ood_tpr)
    # rounded to 6 decimals (the same bytes on machines whose last bits differ), towards answering
    trust = Trust(temperature=round(t, 6), abstain_below=float(np.floor(threshold * 1e6) / 1e6),
                  ood_above=float(np.ceil(ood * 1e6) / 1e6))
    report = {"images": len(labels), "nll_before": round(nll(logits, labels), 4),
              "nll_after": round(nll(logits, labels, t), 4), "abstention": info, **dataclasses.asdict(targets)}
    return trust, report
