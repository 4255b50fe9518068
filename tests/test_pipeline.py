"""End to end: the real `dvc repro` of this project on a reduced config, with the real pretrained weights."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, project_copy

pytestmark = pytest.mark.slow
PER_CLASS = {"train": 8, "val": 6}


def sh(cwd, *cmd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def set_params(repo, **sections):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git clone-like copy of the project whose default data is a few shipped photos per class."""
    repo = project_copy(tmp_path_factory.mktemp("e2e"))
    shutil.rmtree(repo / "outputs", ignore_errors=True)
    (repo / "dvc.lock").unlink(missing_ok=True)
    for split, n in PER_CLASS.items():
        for cls in ("ants", "bees"):
            src = sorted((ROOT / "data/hymenoptera" / split / cls).glob("*.jpg"))[:n]
            dst = repo / "data/mini" / split / cls
            dst.mkdir(parents=True)
            for f in src:
                shutil.copy(f, dst)
    set_params(repo, prepare={"source": "data/mini"},
               train={"lp_views": 1, "lp_steps": 100, "ft_epochs": 1, "batch_size": 8})
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy")
    return repo


def test_repro_builds_a_verified_model_and_caches_it(repo):
    out = sh(repo, "dvc", "repro")
    for stage in ("prepare", "train", "export", "evaluate"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((repo / "outputs/evaluate/metrics.json").read_text())
    assert metrics["val_images"] == 2 * PER_CLASS["val"]
    assert metrics["pytorch"]["accuracy"] >= 0.75          # real ImageNet features: ants vs bees is easy
    assert metrics["onnx"]["accuracy"] == metrics["pytorch"]["accuracy"] and metrics["onnx_agreement"] == 1.0
    parity = json.loads((repo / "outputs/export/parity.json").read_text())
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_logit_diff"] <= 1e-3
    rows = list(csv.DictReader(open(repo / "outputs/prepare/manifest.csv")))
    assert {r["split"] for r in rows} == {"train", "holdout", "val"}
    assert "Data and pipelines are up to date" in sh(repo, "dvc", "repro")
    shown = sh(repo, "dvc", "metrics", "show", "--json")
    assert '"accuracy"' in shown and "top1_agreement" in shown


def test_changing_a_train_param_reruns_train_not_prepare(repo):
    set_params(repo, train={"lp_steps": 90})
    status = json.loads(sh(repo, "dvc", "status", "--json"))
    assert "train" in status and "prepare" not in status
    out = sh(repo, "dvc", "repro")
    assert "Stage 'prepare' didn't change, skipping" in out
    assert "Running stage 'train'" in out


def test_data_that_breaks_the_contract_stops_before_train(repo):
    model = (repo / "outputs/train/model.pt").read_bytes()
    metrics = (repo / "outputs/evaluate/metrics.json").read_text()
    for f in sorted((repo / "data/mini/val/bees").glob("*.jpg"))[1:]:
        f.unlink()                                              # one val bee left: under min_per_class
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["dvc", "repro"], cwd=repo, capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert "validation failed" in r.stderr and "classes.val expect_column_values_to_be_between" in r.stderr
    assert "outputs/validate/docs/index.html" in r.stderr and "Running stage 'train'" not in r.stdout
    docs = (repo / "outputs/validate/docs/index.html").read_text()
    assert "classes" in docs
    assert (repo / "outputs/train/model.pt").read_bytes() == model
    assert (repo / "outputs/evaluate/metrics.json").read_text() == metrics
