import subprocess
import sys

import pytest
import torch

from stages import train
from stages.config import UserError, atomic_text, load_section, resolve_device
from tests.conftest import ROOT


def test_misspelt_key_names_the_fix(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  ft_lrr: 0.1\n")
    with pytest.raises(UserError, match=r"unknown key 'train.ft_lrr'; did you mean 'ft_lr'\?"):
        load_section(train.Params, "train", tmp_path / "params.yaml")


def test_missing_section_and_bad_value(tmp_path):
    (tmp_path / "params.yaml").write_text("trian:\n  seed: 1\n")
    with pytest.raises(UserError, match="section 'train' is missing.*'trian'"):
        load_section(train.Params, "train", tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train:\n  strategy: full\n")
    with pytest.raises(UserError, match="strategy 'full' is not one of"):
        load_section(train.Params, "train", tmp_path / "params.yaml")


def test_values_reach_the_dataclass(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  backbone: test_vit\n  ft_epochs: 7\n")
    p = load_section(train.Params, "train", tmp_path / "params.yaml")
    assert (p.backbone, p.ft_epochs, p.strategy) == ("test_vit", 7, "lp_ft")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    assert resolve_device("auto") == "cpu"
    with pytest.raises(UserError, match="no CUDA GPU is visible.*'auto' or 'cpu'"):
        resolve_device("cuda")
    with pytest.raises(UserError, match="not one of auto, cpu, cuda"):
        resolve_device("gpu")


def test_atomic_text_leaves_no_temp_file(tmp_path):
    atomic_text(tmp_path / "a" / "x.json", "{}")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]


@pytest.mark.parametrize("params, message", [
    ("prepare:\n  source: nowhere\n", "error: source folder 'nowhere' does not exist (params.yaml: prepare.source)"),
    ("prepare:\n  source: nowhere\n  sed: 1\n", "error: params.yaml: unknown key 'prepare.sed'; did you mean 'seed'?"),
])
def test_stage_fails_with_one_line(tmp_path, params, message):
    (tmp_path / "params.yaml").write_text(params)
    r = subprocess.run([sys.executable, "-m", "stages.prepare", "--out", "out"], cwd=tmp_path,
                       capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert r.returncode == 2
    assert r.stderr.strip() == message
