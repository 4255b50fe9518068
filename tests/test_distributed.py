"""The input pipeline's sharding, and `train.workers: 2` on a real local Ray (Ray Train, DDP over gloo)."""
import csv
import time
from pathlib import Path

import pytest
import torch

from stages import loading, train
from stages.checkpoint import load_model
from stages.manifest import read_manifest
from tests.conftest import TINY


def batches(n, world, **kw):
    """Each process's batches of a global batch of 4, as lists of (row, seed)."""
    out = []
    for rank in range(world):
        order = list(loading.Order(n, seed=3, shard=loading.Shard(rank, world, 1), **kw))
        out.append([order[i:i + 4 // world] for i in range(0, len(order), 4 // world)])
    return out


@pytest.mark.parametrize("kw", [{"shuffle": True}, {"weights": torch.tensor([1.0] * 6 + [5.0] * 5)}])
def test_two_shards_of_a_batch_are_the_single_process_batch(kw):
    (solo,), (a, b) = batches(11, 1, **kw), batches(11, 2, **kw)
    assert len(solo) == len(a) == len(b) == 3              # 11 padded to 12: as many steps on each
    assert sorted(a[0] + b[0]) == sorted(solo[0]) and sorted(a[1] + b[1]) == sorted(solo[1])
    assert sorted(a[2] + b[2]) == sorted(solo[2] + [solo[0][0]])   # the pad repeats the epoch's first image
    order = loading.Order(11, seed=3, **kw)
    assert list(order) != list(order)                      # a new draw every epoch


def test_loader_processes_give_the_same_augmented_batches(manifest):
    rows, classes = read_manifest(manifest, {"train"})
    pp = train.backbones.create("test_efficientnet", "none", 2)[1]
    tf = train.presets.train_transform(pp, policy="trivialaugment")
    here, forked = (torch.cat([x for x, _ in loading.loader(rows, classes, tf, 8, shuffle=True, column="cached",
                                                            workers=w)]) for w in (0, 1))
    assert torch.equal(here, forked)
    assert loading.loader_workers(-1, 2) == 0 and loading.loader_workers(-1, 16, "cuda") == 8
    assert loading.loader_workers(3, 2) == 3


@pytest.mark.slow
def test_two_ray_workers_train_like_one(tmp_path, split_folder, manifest, checkpoint, ray_local, monkeypatch,
                                       capfd):
    """lp_ft on 2 Ray Train workers: the features are sharded and joined, so the probe is the single
    process's; the fine-tune runs under DDP; the checkpoint is the usual one. The manifest's paths are relative
    to the working folder, as `dvc repro` makes them (Ray Train starts its workers in a folder of its own)."""
    from stages import prepare
    monkeypatch.chdir(split_folder.parent)
    prepare.run(Path(split_folder.name), Path("relative"), prepare.Params(source=split_folder.name))
    assert not Path(read_manifest("relative/manifest.csv", {"train"})[0][0]["path"]).is_absolute()
    result = train.run(Path("relative/manifest.csv"), tmp_path / "two", train.Params(**{**TINY, "workers": 2}))
    two = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    one = torch.load(checkpoint, weights_only=True)
    assert two["params"]["workers"] == 2 and two["selection"] == result["selection"]
    assert two["selection"]["lp_c"] == one["selection"]["lp_c"]
    assert two["selection"]["cv_acc"] == one["selection"]["cv_acc"]
    assert torch.allclose(two["baseline"]["weight"], one["baseline"]["weight"], atol=1e-4)
    model, classes, pp = load_model(tmp_path / "two" / "model.pt")
    val, _ = read_manifest(manifest, {"val"})
    logits, labels = train.predict(model, loading.loader(val, classes, train.presets.eval_transform(pp), 8), "cpu")
    assert (logits.argmax(1) == labels).float().mean() >= 0.75
    rows = list(csv.DictReader(open(tmp_path / "two" / "history.csv")))
    assert [r["phase"] for r in rows] == ["linear_probe", "finetune"] and float(rows[1]["images_per_s"]) > 0
    assert (tmp_path / "two" / "augmented.png").is_file()
    time.sleep(1)                               # workers' log lines reach the driver's stderr within a second
    assert "Failed to query Ray Train Controller" not in capfd.readouterr().err   # no dashboard here: no noise


@pytest.mark.slow
def test_a_failing_worker_is_named_and_nothing_is_written(tmp_path, manifest, ray_local):
    rows, _ = read_manifest(manifest, {"train"})
    Path(rows[1]["path"]).unlink()                        # position 1: worker 1's share of every pass
    with pytest.raises(train.UserError, match=r"worker 1 of 2 failed: FileNotFoundError: .*No such file"):
        train.run(manifest, tmp_path / "t", train.Params(**{**TINY, "workers": 2, "strategy": "linear_probe"}))
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())


def test_workers_must_divide_the_batch():
    with pytest.raises(train.UserError, match="train.workers must be at least 1 and divide train.batch_size"):
        train.Params(batch_size=32, workers=3)


def test_gpu_check_says_so_in_one_line_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the check would run")
    from benchmarks import gpu_check
    assert gpu_check.main([]) is None
    assert capsys.readouterr().out == "gpu_check: no CUDA GPU visible on this machine; nothing to check\n"
