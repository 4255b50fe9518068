"""Shared fixtures: generated images and tiny models, offline and on the CPU."""
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def descendants(pid):
    """The pids under `pid`: its children, theirs, and so on (from /proc)."""
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in descendants(k)]


def make_image(path, color, size=(48, 40), seed=0, fmt=None):
    """A noisy image whose mean colour carries its class: learnable by a tiny model in a few steps."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, fmt)
    return path


COLORS = {"red": (200, 40, 40), "blue": (40, 40, 200)}


@pytest.fixture
def folder(tmp_path):
    """An ImageFolder without split folders: 12 images per class."""
    root = tmp_path / "images"
    for k, (c, color) in enumerate(COLORS.items()):
        for i in range(12):
            make_image(root / c / f"{i}.png", color, seed=100 * k + i)
    return root


def make_split_folder(root, n_train, n_val, ext="jpg"):
    """An ImageFolder with its own train/ and val/ folders, `n_train` and `n_val` images per class."""
    for split, n in (("train", n_train), ("val", n_val)):
        for k, (c, color) in enumerate(COLORS.items()):
            for i in range(n):
                make_image(root / split / c / f"{i}.{ext}", color, seed=1000 * (split == "val") + 100 * k + i)
    return root


@pytest.fixture
def split_folder(tmp_path):
    return make_split_folder(tmp_path / "split", 10, 4)


TINY = dict(backbone="test_efficientnet", weights="none", batch_size=8, lp_views=2, lp_folds=3,
            ft_epochs=1, ft_lr=0.01, ft_backbone_lr=0.01, policy="none")


@pytest.fixture
def manifest(tmp_path, split_folder):
    from stages import prepare
    prepare.run(split_folder, tmp_path / "prepare", prepare.Params(source=str(split_folder)))
    return tmp_path / "prepare" / "manifest.csv"


@pytest.fixture
def checkpoint(tmp_path, manifest):
    from stages import train
    train.run(manifest, tmp_path / "train", train.Params(**TINY))
    return tmp_path / "train" / "model.pt"


def project_copy(dest):
    """The committed and untracked-but-not-ignored files of this checkout, copied to `dest`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    return dest


def sh(cwd, *cmd, check=True):
    """Run a command with this venv's tools first on PATH; fail the test with its output when it fails."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check:
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def set_params(repo, **sections):
    params = yaml.safe_load((Path(repo) / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (Path(repo) / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))


MINI = {"train": 8, "val": 6}   # shipped photos per class and split in the reduced end-to-end config


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory):
    """A git copy of the project on a few shipped photos per class, built once by the real `dvc repro`
    (real pretrained weights, one fine-tune epoch). Returns (repo, what dvc repro printed)."""
    repo = project_copy(tmp_path_factory.mktemp("mini"))
    shutil.rmtree(repo / "outputs", ignore_errors=True)
    (repo / "dvc.lock").unlink(missing_ok=True)
    for split, n in MINI.items():
        for cls in ("ants", "bees"):
            dst = repo / "data/mini" / split / cls
            dst.mkdir(parents=True)
            for f in sorted((ROOT / "data/hymenoptera" / split / cls).glob("*.jpg"))[:n]:
                shutil.copy(f, dst)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    # nothing is 1000x faster than ONNX FP32: the fixture ships it on every CPU (AVX-512 VNNI would ship INT8 on
    # 12 val images), so tests that compare the deploy model with evaluate's ONNX numbers hold on both CPU types
    set_params(repo, deploy={"int8": {**params["deploy"]["int8"], "calibration_size": 8},
                             "budget": {**params["deploy"]["budget"], "min_speedup": 1000.0}})
    set_params(repo, prepare={"source": "data/mini"},
               train={"ft_epochs": 1, "batch_size": 8, "select": "best"},
               orchestrate={"retries": 0}, prune={"epochs": 0},
               deploy={"rounds": 1, "repeats": 3, "batch_repeats": 1, "warmup": 1, "tries": [{}],
                       "exclude_worst": 0, "diagnose": False, "sizes": [],
                       "serving": {"seconds": 0.1, "rounds": 1, "batches": [1, 4]}})
    sh(repo, "git", "init", "-q")
    out = sh(repo, "dvc", "repro").stdout
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "reproduced")
    return repo, out


@pytest.fixture
def clone(reproduced, tmp_path):
    """A private copy of the reproduced repo (git history, DVC cache and outputs included)."""
    return Path(shutil.copytree(reproduced[0], tmp_path / "repo", symlinks=True))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray per test session (2 CPUs, no dashboard): starting it costs seconds and memory."""
    from stages.cluster import ray_init
    ray = ray_init(num_cpus=2)
    yield ray
    ray.shutdown()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real `prefect server start` (SQLite) for the whole test session: it takes 20 s or more to start."""
    home = tmp_path_factory.mktemp("prefect")
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url,
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}   # schedule runs within seconds
    proc = subprocess.run([sys.executable, "-m", "flows.server"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield env
    os.kill(int((home / "server.pid").read_text()), signal.SIGTERM)


def api(env, method, path, **kw):
    r = httpx.request(method, env["PREFECT_API_URL"] + path, timeout=30, **kw)
    r.raise_for_status()
    return r.json()
