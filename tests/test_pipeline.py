"""End to end: the real `dvc repro` of this project on a reduced config, with the real pretrained weights."""
import csv
import hashlib
import json

import pytest
import yaml

from tests.conftest import MINI, set_params, sh

pytestmark = pytest.mark.slow
GIT = ("git", "-c", "user.name=t", "-c", "user.email=t@t")


def test_repro_builds_a_verified_model_and_caches_it(reproduced):
    repo, out = reproduced
    for stage in ("prepare", "validate", "train", "export", "evaluate", "prune", "deploy", "triton", "trust"):
        assert f"Running stage '{stage}'" in out
    card = json.loads((repo / "outputs/deploy/card.json").read_text())
    assert card["sha256"] == hashlib.sha256((repo / "outputs/deploy/model.onnx").read_bytes()).hexdigest()
    assert (repo / "outputs/triton").is_dir()
    metrics = json.loads((repo / "outputs/evaluate/metrics.json").read_text())
    assert metrics["val_images"] == 2 * MINI["val"]
    assert metrics["pytorch"]["accuracy"] >= 0.75          # real ImageNet features: ants vs bees is easy
    assert metrics["onnx"]["accuracy"] == metrics["pytorch"]["accuracy"] and metrics["onnx_agreement"] == 1.0
    parity = json.loads((repo / "outputs/export/parity.json").read_text())
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_logit_diff"] <= 1e-3
    rows = list(csv.DictReader(open(repo / "outputs/prepare/manifest.csv")))
    assert {r["split"] for r in rows} == {"train", "holdout", "val"}
    assert json.loads((repo / "outputs/validate/summary.json").read_text())["success"] is True
    assert "Data and pipelines are up to date" in sh(repo, "dvc", "repro").stdout
    shown = sh(repo, "dvc", "metrics", "show", "--json").stdout
    assert '"accuracy"' in shown and "top1_agreement" in shown and "synthetic_energy_auroc" in shown
    trusted = json.loads((repo / "outputs/trust/metrics.json").read_text())
    assert trusted["temperature"] == card["trust"]["temperature"] and trusted["val_images"] == 2 * MINI["val"]


def test_changing_a_train_param_reruns_train_not_prepare(clone):
    set_params(clone, train={"lp_folds": 4})
    status = json.loads(sh(clone, "dvc", "status", "--json").stdout)
    assert "train" in status and "prepare" not in status and "validate" not in status
    out = sh(clone, "dvc", "repro", "train").stdout
    assert "Stage 'prepare' didn't change, skipping" in out
    assert "Running stage 'train'" in out


def test_data_that_breaks_the_contract_stops_before_train(clone):
    model = (clone / "outputs/train/model.pt").read_bytes()
    metrics = (clone / "outputs/evaluate/metrics.json").read_text()
    for f in sorted((clone / "data/mini/val/bees").glob("*.jpg"))[1:]:
        f.unlink()                                              # one val bee left: under min_per_class
    r = sh(clone, "dvc", "repro", check=False)
    assert r.returncode != 0
    assert "validation failed" in r.stderr and "classes.val expect_column_values_to_be_between" in r.stderr
    assert "outputs/validate/docs/index.html" in r.stderr and "Running stage 'train'" not in r.stdout
    assert "classes" in (clone / "outputs/validate/docs/index.html").read_text()
    assert (clone / "outputs/train/model.pt").read_bytes() == model
    assert (clone / "outputs/evaluate/metrics.json").read_text() == metrics


def artifact_hashes(repo):
    """The md5 DVC recorded for the data, the model and its export (run times in logs and docs differ)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    hashes = {o["path"]: o["md5"] for stage in ("prepare", "train", "export") for o in lock[stage]["outs"]}
    assert {"outputs/prepare", "outputs/train/model.pt", "outputs/export/model.onnx"} <= set(hashes)
    return {k: v for k, v in hashes.items() if not k.endswith("history.csv")}


def test_a_past_experiment_comes_back_exactly(clone):
    """Two committed experiments; checking out the first restores its exact model from DVC's cache, and
    rebuilding it from scratch there reproduces its metrics."""
    first = artifact_hashes(clone)
    first_metrics = (clone / "outputs/evaluate/metrics.json").read_text()
    set_params(clone, train={"strategy": "linear_probe"})
    sh(clone, "dvc", "repro")
    sh(clone, "git", "add", "-A")
    sh(clone, *GIT, "commit", "-qm", "experiment 2: linear probe")
    assert artifact_hashes(clone)["outputs/train/model.pt"] != first["outputs/train/model.pt"]
    sh(clone, "git", "checkout", "-q", "HEAD~1")
    sh(clone, "dvc", "checkout")
    assert "Data and pipelines are up to date" in sh(clone, "dvc", "repro").stdout
    assert md5(clone / "outputs/train/model.pt") == first["outputs/train/model.pt"]     # the exact bytes
    assert md5(clone / "outputs/export/model.onnx") == first["outputs/export/model.onnx"]
    assert (clone / "outputs/evaluate/metrics.json").read_text() == first_metrics
    sh(clone, "dvc", "repro", "--force", "--single-item", "train")    # retrain from scratch...
    sh(clone, "dvc", "repro", "evaluate")
    assert (clone / "outputs/evaluate/metrics.json").read_text() == first_metrics   # ...same metrics


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()
