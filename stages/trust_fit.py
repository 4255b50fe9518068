"""The trust settings of the file the deploy stage ships, fitted on images it was not fitted on.

`trusted` appends the `ood_score` output (stages/ood.py) to the chosen file, its KNN bank built through that
file, then fits temperature, abstention and OOD thresholds (stages/trust.py) on held-out logits and scores.
"""
import dataclasses

import numpy as np
import onnx
import torch

from stages import loading, ood, probe, quantize, runtime, trust
from stages.checkpoint import saved_params
from stages.config import UserError
from stages.export import predict_onnx
from stages.train import Params as TrainParams, probe_features, probe_views

# folds of the out-of-fold probe logits the temperature is fitted on, at least: a tenth of the rows left out, not
# train's fifth (shipped data, val ECE after scaling: 0.0329 at 5 folds, 0.0276 at 10 with C matched per row)
TRUST_FOLDS = 10


def heldout_logits(model, ckpt, chosen, chosen_file, hold, rows, classes, pp, p):
    """(logits, labels) of images the shipped model was not fitted on, for `trust.fit`: the chosen file's on
    holdout; but a probe refitted on train + holdout (the probe kept, and the variant not pruned: pruning refits
    its own head and body) has seen holdout, and its holdout logits are overconfident, so then out-of-fold probe
    logits over train + holdout on the frozen body (each fold fitted on train's probe views of its images), at
    train's C per row and at least TRUST_FOLDS folds, the chosen file's preprocessing `pp` (PyTorch: the FP32 ONNX
    file's to 1e-5; an INT8 file's differ by its rounding)."""
    sel, tp = ckpt.get("selection", {}), ckpt["params"]
    if sel.get("kept") != "linear_probe" or chosen.startswith("pruned"):
        return predict_onnx(runtime.session(chosen_file, p.threads), hold)
    fp = dataclasses.replace(saved_params(ckpt, TrainParams), batch_size=p.batch_size)
    x, y, image = probe_features(model, rows, classes, fp, "cpu", probe_views(pp, fp))
    out = probe.out_of_fold(x, y, sel.get("lp_c", 1.0), max(tp["lp_folds"], TRUST_FOLDS), tp["seed"],
                            tp["balance"] != "none", per_row=True, image=image)
    return torch.from_numpy(out), torch.from_numpy(y[:len(rows)])


def with_ood(chosen_file, train, classes, pp, path, p):
    """(`path`, bank rows): `chosen_file` with its `ood_score` output (stages/ood.py) written to `path`. The
    bank: up to `trust.ood_bank` train images (stratified, seeded), their features from the chosen file itself."""
    rows = quantize.calibration_rows(train, p.trust.ood_bank, p.seed) if len(train) > p.trust.ood_bank else train
    if len(rows) < p.trust.ood_k:
        raise UserError(f"deploy.trust.ood_k is {p.trust.ood_k}, but train has only {len(rows)} images")
    sess = runtime.session(chosen_file, p.threads)
    if runtime.FEATURES not in [o.name for o in sess.get_outputs()]:
        raise UserError(f"{chosen_file} has no {runtime.FEATURES!r} output: re-run the export stage "
                        "(`dvc repro export`), which adds it")
    bank = np.concatenate([sess.run([runtime.FEATURES], {runtime.INPUT: x.numpy()})[0]
                           for x, _ in loading.tensors(rows, classes, pp, p.batch_size)])
    onnx.save(ood.with_knn(onnx.load(str(chosen_file)), bank, p.trust.ood_k), str(path))
    return path, len(bank)


def trusted(model, ckpt, chosen, chosen_file, train, hold_rows, path, p):
    """(`path`, Trust, fit report): the chosen file with its OOD output, and the trust settings fitted on
    holdout (its logits as `heldout_logits` picks them; its OOD scores through the new file), every image
    preprocessed as the file's metadata says (a deploy variant may test at another size than training's)."""
    classes, pp = runtime.metadata(runtime.session(chosen_file))
    hold = loading.tensors(hold_rows, classes, pp, p.batch_size)
    path, bank_images = with_ood(chosen_file, train, classes, pp, path, p)
    sess = runtime.session(path, p.threads)
    scores = np.concatenate([sess.run([runtime.OOD], {runtime.INPUT: x.numpy()})[0] for x, _ in hold])
    logits, labels = heldout_logits(model, ckpt, chosen, chosen_file, hold, train + hold_rows, classes, pp, p)
    fitted, fit = trust.fit(logits.numpy(), labels.numpy(), p.trust, scores)
    return path, fitted, {**fit, "ood_bank_images": bank_images}
