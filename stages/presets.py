"""The one place that owns preprocessing: training, evaluation, export parity and serving import it.

A `Preprocessing` comes from the model (timm's data config or torchvision's weights), travels inside the
checkpoint and the ONNX metadata, and rebuilds the exact eval transform anywhere.

Imports numpy and Pillow only: the server and batch prediction use it without torch. torch and torchvision are
imported inside the calls that make tensors (`EvalTransform.__call__`, `train_transform`, `get_policy`).
"""
import dataclasses
import json
import math

import numpy as np
from PIL import Image, ImageOps

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")   # the names torchvision and PIL share (upper case in PIL)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    input_size: int          # square crop fed to the network, px
    resize: int              # shorter side before the centre crop, px (input_size / crop_pct)
    mean: tuple
    std: tuple
    interpolation: str = "bicubic"
    train_size: int = 0      # square of training's random crops, px; 0: input_size (see `at_size`)

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")

    def to_json(self):
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text):
        d = json.loads(text)
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def at_size(self, size):
        """This preprocessing for testing at `size` px, the centre crop's share of the resized image unchanged
        (0: itself).

        Random resized crops show the network objects larger than a centre crop of the same size does; testing
        at a somewhat higher resolution than training makes up for it (Touvron et al., "Fixing the train-test
        resolution discrepancy", 2019; timm's `test_input_size`). Training's crops keep the backbone's size
        (`train_size`); everything else, the checkpoint's preprocessing included, uses the returned `input_size`.
        """
        if not size or size == self.input_size:
            return self
        return dataclasses.replace(self, input_size=size, resize=math.floor(size * self.resize / self.input_size),
                                   train_size=self.train_size or self.input_size)


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
        a = np.asarray(im)                            # uint16 for I;16*, int32 for I, float32 for F
        wide = im.mode.startswith("I;16") or a.max() > 255
        if a.dtype.kind == "f":                       # no integer to keep: float32, never a float64 copy
            a = np.clip(a * np.float32(1 / 257) if wide else a, 0, 255)
        else:                                         # x * 255 / 65535 is x // 257 exactly, in x's own width
            a = (a if a.dtype == np.uint16 else np.clip(a, 0, 65535)) // 257 if wide else np.clip(a, 0, 255)
        im = Image.fromarray(a.astype(np.uint8))
    return im.convert("RGB")


def _tail(pp):
    import torch
    from torchvision.transforms import v2 as T

    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pp.mean, pp.std)]


class EvalTransform:
    """Resize the shorter side to `resize`, centre-crop `input_size`, normalise: what evaluation, export and the
    server see. PIL image -> (3, H, W) float32 tensor; `array` gives the same values as a numpy array, without
    torch (what the server runs).

    torchvision's Resize + CenterCrop + ToImage + ToDtype + Normalize to within half a grey level on average (PIL
    rounds between its passes; tests compare them), at a quarter of the cost: PIL resamples only the crop's box
    of the source (same filter support and sample positions), and numpy normalises. Serving pays it per request.
    """

    def __init__(self, pp):
        self.size, self.resize = pp.input_size, pp.resize
        self.mode = Image.Resampling[pp.interpolation.upper()]
        self.scale = (1 / (255 * np.asarray(pp.std, np.float32))).reshape(3, 1, 1)
        self.shift = (np.asarray(pp.mean, np.float32) / np.asarray(pp.std, np.float32)).reshape(3, 1, 1)

    def array(self, im):
        """PIL image -> (3, H, W) float32 numpy array: the network input, no torch involved."""
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        long = int(self.resize * long / short)                 # torchvision's rounding of the long side
        rw, rh = (self.resize, long) if w <= h else (long, self.resize)
        left, top = int(round((rw - self.size) / 2)), int(round((rh - self.size) / 2))
        sx, sy = w / rw, h / rh                                # source px per resized px
        box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
        if rw < self.size or rh < self.size:                   # never with resize >= input_size
            raise ValueError(f"resize {self.resize} is smaller than input_size {self.size}")
        x = np.asarray(im.resize((self.size, self.size), self.mode, box=box), np.float32).transpose(2, 0, 1)
        return x * self.scale - self.shift

    def __call__(self, im):
        """PIL image -> (3, H, W) float32 torch tensor: `array`'s values, shared, not copied."""
        import torch

        return torch.from_numpy(self.array(im))


def eval_transform(pp):
    """The deterministic transform every model input outside training goes through (see `EvalTransform`)."""
    return EvalTransform(pp)


class Mirrored:
    """`transform`'s output flipped left to right: the mirror view train's probe also fits (see
    stages.train.probe_views). A class, not a lambda: DataLoader worker processes pickle it."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, im):
        return self.transform(im).flip(-1)


def train_transform(pp, scale=(0.35, 1.0), hflip=0.5, policy="none"):
    """Random resized crop and flip, plus an optional automatic augmentation policy."""
    from torchvision.transforms import v2 as T

    mode = T.InterpolationMode(pp.interpolation)
    size = pp.train_size or pp.input_size
    ops = [T.RandomResizedCrop(size, scale=tuple(scale), interpolation=mode, antialias=True)]
    if hflip:
        ops.append(T.RandomHorizontalFlip(hflip))
    ops += get_policy(policy)
    return T.Compose(ops + _tail(pp))


POLICIES = {                      # name -> torchvision v2 transform class names (none: no policy)
    "none": (),
    "trivialaugment": ("TrivialAugmentWide",),
    "randaugment": ("RandAugment",),
}


def get_policy(name):
    from stages.config import UserError

    if name not in POLICIES:
        raise UserError(f"unknown augmentation policy '{name}'; choose one of {', '.join(POLICIES)}")
    if not POLICIES[name]:
        return []
    from torchvision.transforms import v2 as T

    return [getattr(T, op)() for op in POLICIES[name]]
