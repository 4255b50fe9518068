import csv

import pytest
import torch

from stages import probe, train
from stages.checkpoint import load_model
from stages.machine import cpu
from stages.manifest import read_manifest
from tests.conftest import TINY


@pytest.mark.parametrize("strategy", ["linear_probe", "finetune", "lp_ft"])
def test_strategies_learn_and_save_a_complete_checkpoint(tmp_path, manifest, strategy):
    result = train.run(manifest, tmp_path / "t", train.Params(**{**TINY, "strategy": strategy, "ft_epochs": 2}))
    phases = [h["phase"] for h in result["history"]]
    assert phases == {"linear_probe": ["linear_probe"], "finetune": ["finetune"] * 2,
                      "lp_ft": ["linear_probe", "finetune", "finetune"]}[strategy]
    ckpt = torch.load(tmp_path / "t" / "model.pt", weights_only=True)   # no pickled code in it
    assert ckpt["classes"] == ["blue", "red"] and ckpt["backbone"] == "test_efficientnet"
    assert ckpt["params"]["strategy"] == strategy and ckpt["built_on"] == cpu()   # the CPU that trained it
    model, classes, pp = load_model(tmp_path / "t" / "model.pt")
    val, _ = read_manifest(manifest, {"val"})
    logits, labels = train.predict(model, train.loader(val, classes, train.presets.eval_transform(pp), 8), "cpu")
    assert (logits.argmax(1) == labels).float().mean() >= 0.75     # red vs blue is easy
    rows = list(csv.DictReader(open(tmp_path / "t" / "history.csv")))
    assert [r["phase"] for r in rows] == phases


def test_linear_probe_leaves_the_body_untouched(tmp_path, manifest):
    train.run(manifest, tmp_path / "t", train.Params(**{**TINY, "strategy": "linear_probe"}))
    model, _, _ = load_model(tmp_path / "t" / "model.pt")
    torch.manual_seed(0)   # the seed train.run uses before it builds the model
    fresh = train.backbones.create("test_efficientnet", "none", 2)[0]
    assert torch.equal(model.body.conv_stem.weight, fresh.body.conv_stem.weight)


def test_training_is_deterministic(tmp_path, manifest):
    for d in ("a", "b"):
        train.run(manifest, tmp_path / d, train.Params(**TINY))
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True)["model"] for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()


def test_holdout_never_includes_val(tmp_path, manifest):
    val, _ = read_manifest(manifest, {"val"})
    seen, _ = read_manifest(manifest, {"train", "holdout"})
    assert not {r["path"] for r in val} & {r["path"] for r in seen}


def test_balance_mix_and_the_augmented_grid(tmp_path, manifest):
    rows, classes = read_manifest(manifest, {"train"})
    skewed = rows + [r for r in rows if r["label"] == "red"] * 2          # red 3x as frequent
    w = train.class_weights(skewed, classes)
    assert w[classes.index("blue")] == pytest.approx(3 * w[classes.index("red")])
    drawn = [y for _, ys in train.loader(skewed, classes, train.presets.eval_transform(
        train.backbones.create("test_efficientnet", "none", 2)[1]), 8, balanced=True, column="cached")
        for y in ys.tolist()]
    assert 0.35 < drawn.count(classes.index("blue")) / len(drawn) < 0.65   # ~1/2, not 1/4
    p = train.Params(**{**TINY, "balance": "loss", "mix": "cutmix"})
    train.run(manifest, tmp_path / "t", p)
    from PIL import Image
    with Image.open(tmp_path / "t" / "augmented.png") as im:
        assert im.format == "PNG" and im.width > 4 * 32
    with pytest.raises(train.UserError, match="train.mix 'blend' is not one of none, mixup, cutmix"):
        train.Params(mix="blend")


def test_test_size_raises_the_test_resolution_and_keeps_the_training_crops(tmp_path, manifest):
    native = train.backbones.create("test_efficientnet", "none", 2)[1]
    p = train.Params(**{**TINY, "ft_epochs": 1, "test_size": native.input_size + 32})
    train.run(manifest, tmp_path / "t", p)
    model, _, pp = load_model(tmp_path / "t" / "model.pt")
    assert pp.input_size == native.input_size + 32 and pp.train_size == native.input_size
    assert pp.input_size / pp.resize == pytest.approx(native.input_size / native.resize, abs=0.01)
    from PIL import Image
    with Image.open(tmp_path / "t" / "augmented.png") as im:    # 4 x 4 crops of train_size, 2 px apart
        assert im.width == 4 * (native.input_size + 2) + 2
    assert train.presets.eval_transform(pp)(Image.new("RGB", (300, 200))).shape[-1] == pp.input_size
    assert native.at_size(0) == native


def test_probe_views_mirror_and_both_sizes_and_cross_validation_keeps_an_images_views_together():
    """The probe fits the plain view at test size, the picture at the training crops' size, and both mirrored
    (none with hflip 0); its folds score plain views of images none of whose views they fitted."""
    import numpy as np
    from PIL import Image

    pp = train.backbones.create("test_efficientnet", "none", 2)[1]
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), np.uint8))
    big = pp.at_size(pp.input_size + 32)
    views = train.probe_views(big, train.Params(**TINY, hflip=0.5))
    out = [v(im) for v in views]
    assert [o.shape[-1] for o in out] == [big.input_size, pp.input_size, big.input_size, pp.input_size, pp.input_size]
    assert torch.equal(out[2], out[0].flip(-1)) and torch.equal(out[3], out[1].flip(-1))
    assert len(train.probe_views(big, train.Params(**{**TINY, "hflip": 0, "lp_views": 1}))) == 2
    assert len(train.probe_views(pp, train.Params(**{**TINY, "lp_views": 1}))) == 2       # plain and mirror
    image = np.tile(np.arange(20), 3)                                   # 20 images, 3 views each
    labels = np.repeat([0, 1], 10)
    for fit, te in probe.image_folds(image, labels, 5, 0):
        assert not set(image[fit]) & set(te) and set(image[fit]) | set(te) == set(range(20))


def test_earned_needs_a_gain_beyond_the_holdouts_noise():
    labels = torch.zeros(48, dtype=torch.long)
    right, wrong = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])

    def logits(n_right):
        return torch.cat([right.repeat(n_right, 1), wrong.repeat(48 - n_right, 1)])
    assert probe.earned(logits(40), logits(40), labels, 2.0)[0] is False      # a tie keeps the probe
    assert probe.earned(logits(41), logits(40), labels, 2.0)[0] is False      # one image is noise
    kept, numbers = probe.earned(logits(45), logits(40), labels, 2.0)
    assert kept and numbers["ft_only_right"] == 5 and numbers["probe_only_right"] == 0
    assert numbers["holdout_gain"] == round(5 / 48, 4) and numbers["holdout_gain_se"] > 0


@pytest.fixture
def larger_manifest(tmp_path):
    """60 train and 6 val images per class: a holdout of 12 per class, enough to tell the two apart."""
    from stages import prepare
    from tests.conftest import make_split_folder
    root = make_split_folder(tmp_path / "larger", 60, 6, ext="png")
    prepare.run(root, tmp_path / "prepare", prepare.Params(source=str(root)))
    return tmp_path / "prepare" / "manifest.csv"


def test_lp_ft_keeps_the_probe_when_fine_tuning_hurts(tmp_path, larger_manifest):
    """A learning rate that wrecks the body: the stage ships the probe, refitted on train + holdout, and says so."""
    p = train.Params(**{**TINY, "ft_epochs": 1, "ft_lr": 30.0, "ft_backbone_lr": 30.0})
    result = train.run(larger_manifest, tmp_path / "t", p)
    sel = result["selection"]
    assert sel["kept"] == "linear_probe" and "did not earn its place" in sel["why"]
    assert sel["probe_holdout_acc"] >= 0.9 and sel["cv_folds"] == 3 and sel["lp_c"] in p.lp_cs
    ckpt = torch.load(tmp_path / "t" / "model.pt", weights_only=True)
    assert ckpt["selection"] == sel
    torch.manual_seed(0)
    fresh = train.backbones.create("test_efficientnet", "none", 2)[0]
    assert all(torch.equal(v, fresh.body.state_dict()[k[5:]]) for k, v in ckpt["model"].items()
               if k.startswith("body."))                                       # the pretrained body, untouched
    assert torch.equal(ckpt["model"]["head.1.weight"], ckpt["baseline"]["weight"])


def test_lp_ft_keeps_the_fine_tune_when_it_helps(tmp_path, larger_manifest):
    """A 'pretrained' body blind to colour (its first layer averages the channels) on classes told apart by
    colour: the probe on its features is poor, fine-tuning relearns the first layer and wins by far."""
    train.run(larger_manifest, tmp_path / "pre", train.Params(**{**TINY, "strategy": "finetune", "ft_epochs": 2}))
    body = {k[5:]: v for k, v in torch.load(tmp_path / "pre" / "model.pt", weights_only=True)["model"].items()
            if k.startswith("body.")}
    body["conv_stem.weight"] = body["conv_stem.weight"].mean(1, keepdim=True).expand_as(body["conv_stem.weight"])
    torch.save({k: v.contiguous() for k, v in body.items()}, tmp_path / "blind.pt")
    p = train.Params(**{**TINY, "weights": str(tmp_path / "blind.pt"), "ft_epochs": 2})
    sel = train.run(larger_manifest, tmp_path / "t", p)["selection"]
    assert sel["probe_holdout_acc"] <= 0.9
    assert sel["kept"] == "finetune" and "beat the probe" in sel["why"], sel
    assert sel["holdout_gain"] > sel["margin_se"] * sel["holdout_gain_se"]
