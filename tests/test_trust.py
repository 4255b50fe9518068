"""Calibration, abstention and out-of-distribution arithmetic (stages/trust.py) on generated logits, and the
trust stage (stages/trust_eval.py) on the tiny deployed model."""
import csv
import dataclasses
import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from stages import deploy, loading, ood, quantize, runtime, trust, trust_eval, trust_fit
from stages.checkpoint import load_model
from stages.config import UserError


def sampled(n, classes, temperature, seed=0):
    """Logits z * T of a model overconfident by T, and labels drawn from softmax(z): T is what fitting
    should find."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (n, classes))
    p = trust.probabilities(z)
    labels = (rng.random((n, 1)) > p.cumsum(1)).sum(1)
    return z * temperature, labels


@pytest.mark.parametrize("t", [0.5, 1.0, 2.5])
def test_temperature_fitting_recovers_a_known_temperature(t):
    logits, labels = sampled(4000, 4, t)
    fitted = trust.fit_temperature(logits, labels)
    assert abs(fitted / t - 1) < 0.08
    assert trust.nll(logits, labels, fitted) <= min(trust.nll(logits, labels, t * f) for f in (0.9, 1.0, 1.1))


def test_energy_is_pytorch_ood_energy_and_probabilities_sum_to_one():
    from pytorch_ood.detector import EnergyBased

    logits = np.random.default_rng(1).normal(0, 5, (50, 3)).astype(np.float32)
    for t in (1.0, 1.7):
        ref = EnergyBased.score(torch.from_numpy(logits).double(), t=t).numpy()
        assert np.allclose(trust.energy(logits, t), ref, atol=1e-9)
        assert np.allclose(trust.probabilities(logits, t).sum(1), 1)
    assert np.allclose(trust.probabilities(logits * 2, 2.0), trust.probabilities(logits))


def test_abstention_threshold_meets_the_target_at_the_largest_coverage_and_respects_the_floor():
    conf = np.array([0.99, 0.98, 0.97, 0.96, 0.95, 0.90, 0.80, 0.70, 0.60, 0.55])
    right = np.array([1, 1, 1, 1, 1, 0, 1, 1, 0, 1], bool)
    t, info = trust.abstain_threshold(conf, right, 1.0, 0.1)
    assert t == 0.95 and info == {"images": 10, "coverage": 0.5, "accuracy": 1.0, "target_met": True}
    t, info = trust.abstain_threshold(conf, right, 0.85, 0.1)       # 7/8 right at 0.70
    assert t == 0.70 and info["coverage"] == 0.8 and info["target_met"]
    t, info = trust.abstain_threshold(conf, right, 1.0, 0.8)        # the floor wins over the target
    assert t == 0.70 and info["coverage"] == 0.8 and not info["target_met"]
    assert trust.abstain_threshold(conf, right, 0.8, 0.1)[0] == 0.0  # all answered: 8/10 right
    tied = np.array([0.9, 0.9, 0.9, 0.5])                            # no cut between equal confidences
    assert trust.abstain_threshold(tied, np.array([1, 0, 1, 1], bool), 1.0, 0.1)[1]["coverage"] == 0.75


def test_fit_decide_and_the_metadata_round_trip():
    rng = np.random.default_rng(2)
    logits, labels = sampled(600, 2, 3.0, seed=3)
    fitted, report = trust.fit(logits, labels, trust.Targets(target_accuracy=0.95, min_coverage=0.3))
    assert 2.5 < fitted.temperature < 3.6 and report["nll_after"] < report["nll_before"]
    probs, reasons = trust.decide(logits, fitted)
    answered = np.array([r is None for r in reasons])
    assert (probs.argmax(1) == labels)[answered].mean() >= 0.95 and answered.mean() >= 0.3
    assert {r for r in reasons} <= {None, "low_confidence"} and fitted.ood_above == np.inf   # no OOD scores
    scores = rng.gamma(4, 0.1, len(labels))
    fitted = trust.fit(logits, labels, trust.Targets(target_accuracy=0.95, min_coverage=0.3), scores)[0]
    assert abs(np.mean(scores <= fitted.ood_above) - 0.95) < 0.01 and fitted.ood_energy_above == np.inf
    far = scores.copy()
    far[:3] = [fitted.ood_above + 1, np.nan, fitted.ood_above]    # over: flagged; NaN: flagged; at: not
    assert [r == "out_of_distribution" for r in trust.decide(logits, fitted, far[:, None])[1][:3]] == [1, 1, 0]
    with pytest.raises(ValueError, match="no ood_score"):
        trust.decide(logits, fitted)
    assert trust.Trust.from_metadata({"trust": fitted.to_json()}) == fitted
    plain = trust.Trust.from_metadata({})                          # an older model: softmax, never abstains
    assert plain == trust.Trust() and json.loads(plain.to_json())["ood_above"] is None
    assert trust.Trust.from_metadata({"trust": plain.to_json()}) == plain
    p, r = trust.decide(rng.normal(0, 1, (5, 2)), plain)
    assert r == [None] * 5
    old = trust.Trust.from_metadata({"trust": json.dumps({"temperature": 1.0, "abstain_below": 0.0,
                                                          "ood_energy_above": -3.0})})   # deployed before ood_score
    assert trust.decide(np.array([[4.0, -4.0], [1.0, -1.0]]), old)[1] == [None, "out_of_distribution"]


def test_the_ood_output_in_the_graph_is_pytorch_ood_knn():
    """`ood.with_knn` appended to a small graph (its output FEATURES a ReLU of a matrix product, so some rows
    are all zeros) gives pytorch_ood's KNN scores; the FEATURES output is gone, the logits are untouched."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    w, head = rng.normal(0, 1, (6, 16)).astype(np.float32), rng.normal(0, 1, (16, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", [runtime.INPUT, "w"], ["h"]), helper.make_node("Relu", ["h"], [runtime.FEATURES]),
         helper.make_node("MatMul", [runtime.FEATURES, "head"], [runtime.OUTPUT])], "g",
        [helper.make_tensor_value_info(runtime.INPUT, TensorProto.FLOAT, [runtime.BATCH, 6])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [runtime.BATCH, d])
         for n, d in ((runtime.OUTPUT, 3), (runtime.FEATURES, 16))],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(head, "head")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    bank = np.maximum(rng.normal(0, 1, (40, 6)).astype(np.float32) @ w, 0)
    x = rng.normal(0, 1, (31, 6)).astype(np.float32)
    x[-1] = 0                                                     # zero features
    for k in (1, 5):
        m = ood.with_knn(model, bank, k)
        sess = onnxruntime.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        assert [o.name for o in sess.get_outputs()] == [runtime.OUTPUT, runtime.OOD]
        logits, score = sess.run(None, {runtime.INPUT: x})
        f = np.maximum(x @ w, 0)
        assert score.shape == (len(x), 1) and np.allclose(logits, f @ head, atol=1e-4)
        assert np.allclose(score[:, 0], ood.knn_scores(bank, f, k), atol=1e-4)
        assert (f[-1] == 0).all() and np.allclose(score[-1], 1.0)    # a zero vector: distance 1 to unit vectors
    with pytest.raises(ValueError, match="k=41"):
        ood.with_knn(model, bank, 41)


def test_bad_trust_targets_fail_with_the_key():
    with pytest.raises(UserError, match="target_accuracy"):
        deploy.Params(trust={"target_accuracy": 1.5})
    with pytest.raises(UserError, match="ood_tpr"):
        deploy.Params(trust={"ood_tpr": "high"})
    with pytest.raises(UserError, match="min_coverge"):
        deploy.Params(trust={"min_coverge": 0.5})


def test_corruptions_keep_shape_and_range_and_grow_with_severity():
    x = torch.rand(2, 3, 32, 32)
    for name, (fn, levels) in trust_eval.CORRUPTIONS.items():
        diffs = []
        for s in levels:
            torch.manual_seed(0)
            y = fn(x, s)
            assert y.shape == x.shape and y.dtype == torch.float32 and 0 <= y.min() and y.max() <= 1, name
            diffs.append((y - x).abs().mean().item())
        assert diffs[0] > 0 and diffs[-1] > diffs[0], name


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """The tiny pipeline, shipped as deploy ships its choice (held-out logits, trust.fit, `deploy.ship`, the
    card) without deploy's variant timing, which tests/test_deploy.py runs."""
    from stages import export, prepare, train
    from stages.card import write_card
    from stages.manifest import read_manifest
    from tests.conftest import TINY, make_split_folder

    d = tmp_path_factory.mktemp("trust")
    src = make_split_folder(d / "split", 12, 6)
    prepare.run(src, d / "prepare", prepare.Params(source=str(src)))
    manifest = d / "prepare" / "manifest.csv"
    train.run(manifest, d / "train", train.Params(**TINY))
    export.run(d / "train" / "model.pt", manifest, d / "export", export.Params())
    model, classes, pp = load_model(d / "train" / "model.pt")
    ckpt = torch.load(d / "train" / "model.pt", weights_only=True)
    (hold, _), (tr, _) = read_manifest(manifest, {"holdout"}), read_manifest(manifest, {"train"})
    p = deploy.Params(batch_size=8, trust={"ood_k": 3})
    hold_x = loading.tensors(hold, classes, pp, 8)
    shipped, fitted, fit = trust_fit.trusted(model, ckpt, "onnx_fp32", d / "export" / "model.onnx", tr, hold,
                                             d / "with_ood.onnx", p)
    card = {"model": (d / "deploy" / "model.onnx").as_posix(), "variant": "onnx_fp32", "classes": classes,
            "trust": {**dataclasses.asdict(fitted), "fit": fit}}
    (d / "deploy").mkdir()
    deploy.ship(shipped, d / "deploy" / "model.onnx", card)
    quantize.quantize(d / "export" / "model.onnx", d / "deploy" / "onnx_int8.onnx",   # as deploy keeps it
                      [x.numpy() for x, _ in hold_x], quantize.Settings())
    return d, write_card(d / "deploy" / "card.json", card), ckpt["selection"]["kept"]


def test_trust_is_fitted_on_held_out_logits_into_the_metadata(deployed):
    d, card, kept = deployed
    fitted = trust.Trust.from_metadata(runtime.session(d / "deploy" / "model.onnx").get_modelmeta()
                                       .custom_metadata_map)
    assert dataclasses.asdict(fitted) == {k: card["trust"][k] for k in ("temperature", "abstain_below",
                                                                          "ood_above", "ood_energy_above")}
    assert 0 < fitted.temperature and 0 <= fitted.abstain_below < 1 and np.isfinite(fitted.ood_above)
    fit = card["trust"]["fit"]
    assert fit["ood_bank_images"] == 20 and fit["ood_k"] == 3     # train's 20 images, all under ood_bank
    assert fit["target_accuracy"] == 0.99 and fit["abstention"]["coverage"] >= 0.5
    # a probe kept has seen holdout: out-of-fold logits over train + holdout (24 images), not holdout's 4
    assert fit["images"] == (24 if kept == "linear_probe" else 4)
    meta = {e.key: e.value for e in onnx.load(str(d / "deploy" / "model.onnx")).metadata_props}
    assert json.loads(meta["trust"]) == card["trust"]


def test_trust_stage_writes_metrics_tables_and_plots(deployed, tmp_path):
    d, card, _ = deployed
    p = trust_eval.Params(batch_size=8, synthetic_images=3, corruption_images=6)
    out = tmp_path / "trust"
    m = trust_eval.run(d / "train" / "model.pt", d / "deploy" / "card.json", d / "export" / "model.onnx",
                       d / "deploy" / "onnx_int8.onnx", d / "prepare" / "manifest.csv", out, p)
    assert json.loads((out / "metrics.json").read_text()) == m
    assert m["temperature"] == card["trust"]["temperature"] and m["val_images"] == 12
    for when in ("before", "after"):
        assert 0 <= m["calibration"][when]["ece"] <= 1 and m["calibration"][when]["nll"] >= 0
    assert m["calibration"]["after"]["nll"] <= m["calibration"]["before"]["nll"] + 0.05
    a = m["abstention"]
    assert a["answered"] + a["flagged_low_confidence"] + a["flagged_out_of_distribution"] == 12
    assert a["accuracy_ci95"][0] <= (a["accuracy_answered"] or 0) <= a["accuracy_ci95"][1]
    assert m["pytorch_vs_deploy_max_prob_diff"] < 1e-4       # the deploy file is the export's FP32 graph here
    o = m["ood"]
    assert o["synthetic_images"] == 12 and all(0 <= o[k] <= 1 for k in o if "auroc" in k)
    assert set(o["left_out_class"]) == {"blue", "red"} and "energy_auroc" not in o["left_out_class"]["red"]
    rows = list(csv.DictReader(open(out / "corruptions.csv")))
    assert len(rows) == 1 + 6 * 3 and rows[0]["corruption"] == "clean" and float(rows[0]["pytorch_relative"]) == 1
    r = m["robustness"]
    assert r["images"] == 6 and not r["deploy_is_int8"]
    for row in rows:       # FP32 ships here: its column is export's FP32 file's, and INT8 is scored beside it
        assert row["deploy"] == row["onnx_fp32"] and 0 <= float(row["onnx_int8"]) <= 1
    bad = [row for row in rows if row["severity"] != "0"]
    assert r["int8_minus_fp32"] == round(np.mean([float(b["onnx_int8"]) - float(b["onnx_fp32"]) for b in bad]), 4)
    assert {f"int8_minus_fp32_{c}" for c in trust_eval.CORRUPTIONS} <= set(r)
    assert {f"mean_relative_{c}" for c in ("pytorch", "onnx_fp32", "onnx_int8", "deploy")} <= set(r)
    curve = list(csv.DictReader(open(out / "risk_coverage.csv")))
    assert len(curve) == 12 and float(curve[-1]["coverage"]) == 1.0
    for png in ("reliability", "risk_coverage", "ood_score", "corruptions"):
        assert (out / f"{png}.png").read_bytes()[:4] == b"\x89PNG"


def test_trust_stage_scores_a_deploy_model_at_a_test_size_of_its_own(deployed, tmp_path):
    """A deploy variant at 128 px (`deploy.sizes`; the checkpoint's is 160): val, the generated images and the
    deploy model's corrupted copies are preprocessed at the file's size, PyTorch and export's files at theirs."""
    from stages import export
    from stages.card import write_card
    from stages.manifest import read_manifest

    d, _, _ = deployed
    model, classes, pp = load_model(d / "train" / "model.pt")
    ckpt = torch.load(d / "train" / "model.pt", weights_only=True)
    export.to_onnx(model, classes, pp.at_size(128), tmp_path / "onnx_fp32_128.onnx")
    (hold, _), (tr, _) = (read_manifest(d / "prepare" / "manifest.csv", {s}) for s in ("holdout", "train"))
    shipped, fitted, fit = trust_fit.trusted(model, ckpt, "onnx_fp32_128", tmp_path / "onnx_fp32_128.onnx", tr,
                                             hold, tmp_path / "with_ood.onnx", deploy.Params(batch_size=8,
                                                                                              trust={"ood_k": 3}))
    card = {"model": (tmp_path / "model.onnx").as_posix(), "variant": "onnx_fp32_128", "classes": classes,
            "preprocessing": dataclasses.asdict(pp.at_size(128)), "trust": {**dataclasses.asdict(fitted), "fit": fit}}
    deploy.ship(shipped, tmp_path / "model.onnx", card)
    write_card(tmp_path / "card.json", card)
    m = trust_eval.run(d / "train" / "model.pt", tmp_path / "card.json", d / "export" / "model.onnx",
                       d / "deploy" / "onnx_int8.onnx", d / "prepare" / "manifest.csv", tmp_path / "trust",
                       trust_eval.Params(batch_size=8, synthetic_images=2, corruption_images=4))
    assert m["variant"] == "onnx_fp32_128" and m["pytorch_vs_deploy_max_prob_diff"] is None   # not one size
    assert m["ood"]["synthetic_images"] == 8 and 0 <= m["calibration"]["after"]["ece"] <= 1
    rows = list(csv.DictReader(open(tmp_path / "trust" / "corruptions.csv")))
    assert len(rows) == 19 and {"pytorch", "onnx_fp32", "onnx_int8", "deploy"} <= set(rows[0])
    assert m["robustness"]["images"] == 4 and "mean_relative_deploy" in m["robustness"]


def test_out_of_fold_probes_matched_per_row_are_as_confident_as_the_probe_on_all_rows():
    """At one C a probe fitted on 4/5 of the rows is more strongly regularised than the shipped one (scikit-learn's
    C multiplies the summed loss); `per_row` scales C by n / rows fitted, and its logits' spread is the full one's."""
    from stages import probe
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 40)
    x = rng.normal(0, 1, (80, 8)) + y[:, None] * 0.8
    spread = lambda z: float(np.abs(np.asarray(z)[:, 1] - np.asarray(z)[:, 0]).mean())  # noqa: E731
    full = spread(probe.head_logits(x, *probe.fit_probe(x, y, 0.01, False)))
    plain, matched = (spread(probe.out_of_fold(x, y, 0.01, 5, 0, False, per_row=r)) for r in (False, True))
    assert plain < matched and abs(matched - full) < abs(plain - full) / 3
