"""The one place that owns preprocessing: training, evaluation, export parity and serving import it.

A `Preprocessing` comes from the model (timm's data config or torchvision's weights), travels inside the
checkpoint and the ONNX metadata, and rebuilds the exact eval transform anywhere.
"""
import dataclasses
import json

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T

INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    input_size: int          # square crop fed to the network, px
    resize: int              # shorter side before the centre crop, px (input_size / crop_pct)
    mean: tuple
    std: tuple
    interpolation: str = "bicubic"

    def to_json(self):
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text):
        d = json.loads(text)
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


def load_rgb(path_or_file):
    """Decode an image file as RGB the one consistent way (see `to_rgb`)."""
    with Image.open(path_or_file) as im:
        return to_rgb(im)


def to_rgb(im):
    """RGB from any PIL mode: EXIF orientation applied, transparency onto white, 16-bit scaled to 8."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    elif im.mode.startswith("I") or im.mode == "F":   # 16/32-bit grey: the full range onto 0..255
        a = np.asarray(im, dtype=np.float64)
        scale = 255.0 / 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 1.0
        im = Image.fromarray((a * scale).clip(0, 255).astype(np.uint8))
    return im.convert("RGB")


def _tail(pp):
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pp.mean, pp.std)]


def eval_transform(pp):
    """Resize the shorter side, centre-crop, normalise: what evaluation, export and the server see."""
    mode = INTERPOLATIONS[pp.interpolation]
    return T.Compose([T.Resize(pp.resize, interpolation=mode, antialias=True),
                      T.CenterCrop(pp.input_size), *_tail(pp)])


def train_transform(pp, scale=(0.35, 1.0), hflip=0.5, policy="none"):
    """Random resized crop and flip, plus an optional automatic augmentation policy."""
    mode = INTERPOLATIONS[pp.interpolation]
    ops = [T.RandomResizedCrop(pp.input_size, scale=tuple(scale), interpolation=mode, antialias=True)]
    if hflip:
        ops.append(T.RandomHorizontalFlip(hflip))
    ops += get_policy(policy)
    return T.Compose(ops + _tail(pp))


POLICIES = {
    "none": lambda: [],
    "trivialaugment": lambda: [T.TrivialAugmentWide()],
    "randaugment": lambda: [T.RandAugment()],
}


def get_policy(name):
    from stages.config import UserError

    if name not in POLICIES:
        raise UserError(f"unknown augmentation policy '{name}'; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]()
