import shutil
import subprocess
import sys

import pytest
import torch

from stages import train
from stages.config import Devices, UserError, atomic_text, load_section, resolve_device, stage_device
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


def test_devices_is_validated_like_every_section(tmp_path):
    """A typo in `devices` is one line naming the right key, a bad value names the choices; no section: auto."""
    params = tmp_path / "params.yaml"
    params.write_text("devices:\n  trian: cpu\n")
    with pytest.raises(UserError, match=r"unknown key 'devices.trian'; did you mean 'train'\?"):
        stage_device("train", params)
    params.write_text("devices:\n  train: gpu\n")
    with pytest.raises(UserError, match="train is 'gpu', not one of auto, cpu, cuda"):
        stage_device("train", params)
    params.write_text("devices:\n  evaluate: cpu\n")
    assert stage_device("evaluate", params) == "cpu" and stage_device("prepare", params) == resolve_device("auto")
    params.write_text("train: {}\n")
    assert stage_device("train", params) == resolve_device("auto")


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


def test_numbers_as_yaml_1_2_reads_them_and_wrong_types_name_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  ft_lr: 1e-3\n  hflip: 1\n  ft_epochs: 2e1\n  crop_scale: [0.5, 1]\n")
    p = load_section(train.Params, "train", params)
    assert (p.ft_lr, p.hflip, p.ft_epochs, p.crop_scale) == (0.001, 1.0, 20, (0.5, 1))
    assert isinstance(p.hflip, float) and isinstance(p.ft_epochs, int)
    for text, message in [("ft_epochs: three", "train.ft_epochs must be an integer, not the string 'three'$"),
                          ("ft_epochs: '3'", r"train.ft_epochs must be an integer, not the string '3' \(remove the"),
                          ("ft_epochs: 2.5", r"train.ft_epochs must be an integer, not 2.5 \(float\)"),
                          ("ft_lr: true", r"train.ft_lr must be a number, not True \(bool\)"),
                          ("backbone: 7", r"train.backbone must be a string, not 7 \(int\)"),
                          ("crop_scale: 0.5", r"train.crop_scale must be a list, not 0.5")]:
        params.write_text(f"train:\n  {text}\n")
        with pytest.raises(UserError, match=message):
            load_section(train.Params, "train", params)


def test_nested_sections_are_typed_too(tmp_path):
    from stages import deploy
    params = tmp_path / "params.yaml"
    params.write_text("deploy:\n  budget: {min_speedup: 2}\n  int8: {calibration_size: 1e1}\n")
    p = load_section(deploy.Params, "deploy", params)
    assert p.budget.min_speedup == 2.0
    params.write_text("deploy:\n  budget: {min_agreement: high}\n")
    with pytest.raises(UserError, match="deploy.budget.min_agreement must be a number, not the string 'high'"):
        load_section(deploy.Params, "deploy", params)
    params.write_text("deploy:\n  int8: {per_channel: 'no'}\n")
    with pytest.raises(UserError, match="deploy.int8.per_channel must be true or false"):
        load_section(deploy.Params, "deploy", params)


def test_every_shipped_section_loads(tmp_path):
    """The committed params.yaml passes its own type checks (a default written '5' where 5.0 is meant fails)."""
    from flows.pipeline import Params as Orchestrate
    from serve.model import Params as Serve
    from stages import deploy, evaluate, export, prepare, prune, validate
    for cls, section in [(prepare.Params, "prepare"), (validate.Params, "validate"), (train.Params, "train"),
                         (export.Params, "export"), (evaluate.Params, "evaluate"), (prune.Params, "prune"),
                         (deploy.Params, "deploy"), (Serve, "serve"), (Orchestrate, "orchestrate"),
                         (Devices, "devices")]:
        load_section(cls, section, ROOT / "params.yaml")


def test_dvc_exp_run_set_param_leaves_a_valid_params_yaml(tmp_path):
    """`dvc exp run -S` rewrites params.yaml: the shipped file must come back as the same values, one changed."""
    from stages.config import read_params
    from tests.conftest import sh
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages:\n  copy:\n    cmd: cp params.yaml out.txt\n    params:\n"
                                       + "".join(f"      - {s}\n" for s in read_params(tmp_path / "params.yaml")
                                                 if s != "devices") + "    outs:\n      - out.txt\n")
    git = ("git", "-c", "user.name=t", "-c", "user.email=t@t")
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "dvc", "init", "-q")
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, *git, "commit", "-qm", "init")
    before = read_params(tmp_path / "params.yaml")
    sh(tmp_path, "dvc", "exp", "run", "-S", "train.strategy=linear_probe", "-S", "deploy.budget.min_speedup=1.2")
    after = read_params(tmp_path / "params.yaml")
    before["train"]["strategy"], before["deploy"]["budget"]["min_speedup"] = "linear_probe", 1.2
    assert after == before
    assert "linear_probe" in sh(tmp_path, "dvc", "exp", "show", "--csv").stdout


def test_a_killed_writes_temporary_file_is_removed_by_the_next_write(tmp_path):
    import fcntl
    import os
    import time
    stale, live = tmp_path / ".model.pt.k1ll3d.pt", tmp_path / ".model.pt.l1ve.pt"
    for f in (stale, live):
        f.write_bytes(b"half a checkpoint")
        os.utime(f, (time.time() - 60, time.time() - 60))
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)                      # another run still writing it
    try:
        atomic_text(tmp_path / "model.pt", "x")
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.pt.l1ve.pt", "model.pt"]
