"""The eval transform: the fast path must compute what torchvision's Resize + CenterCrop + Normalize compute."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from stages import presets

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = sorted((ROOT / "data/hymenoptera").glob("*/*/*.jpg"))[::25]


def reference(pp):
    mode = T.InterpolationMode(pp.interpolation)
    return T.Compose([T.Resize(pp.resize, interpolation=mode, antialias=True), T.CenterCrop(pp.input_size),
                      T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pp.mean, pp.std)])


@pytest.mark.parametrize("pp", [
    presets.Preprocessing(224, 256, (0.5,) * 3, (0.5,) * 3, "bicubic"),             # efficientnet_lite0's
    presets.Preprocessing(224, 232, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear"),   # resnet's
    presets.Preprocessing(240, 240, (0.5,) * 3, (0.25,) * 3, "bicubic"),           # crop = whole short side
])
def test_eval_transform_matches_torchvision(pp):
    images = [presets.load_rgb(f) for f in PHOTOS]
    images += [im.transpose(Image.Transpose.ROTATE_90) for im in images[:3]]     # portrait too
    images.append(images[0].resize((700, 260)))                                  # a wide panorama
    assert len(images) >= 12
    ref, fast = reference(pp), presets.eval_transform(pp)
    levels = torch.tensor(pp.std)[:, None, None] * 255     # normalised units -> grey levels
    for im in images:
        a, b = ref(im), fast(im)
        assert b.shape == a.shape == (3, pp.input_size, pp.input_size) and b.dtype == torch.float32
        diff = ((a - b) * levels).abs()
        assert diff.max() <= 8, im.size                     # a few pixels: PIL rounds to uint8 between passes
        assert diff.mean() <= 0.5, im.size                  # a crop one pixel off gives several levels


def test_eval_transform_refuses_resize_below_crop():
    tf = presets.eval_transform(presets.Preprocessing(224, 200, (0.5,) * 3, (0.5,) * 3))
    with pytest.raises(ValueError, match="smaller than input_size"):
        tf(Image.new("RGB", (300, 300)))


def test_numpy_path_gives_the_torch_path_tensors():
    """The server's `array` (no torch) and the pipeline's `__call__` give identical values, on generated images of
    several sizes, modes and aspect ratios."""
    rng = np.random.default_rng(0)
    pp = presets.Preprocessing(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")
    tf = presets.eval_transform(pp)
    for size, mode in (((300, 200), "RGB"), ((224, 224), "RGB"), ((257, 640), "L"), ((1000, 300), "RGBA")):
        pixels = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
        im = presets.to_rgb(Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode))
        a, t = tf.array(im), tf(im)
        assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (3, 224, 224)
        assert t.dtype == torch.float32 and np.array_equal(t.numpy(), a)


def test_serving_imports_no_torch():
    """The server, the folder predictor, the Triton writer and the report page (with the scores it states)
    import neither torch, torchvision nor timm."""
    code = ("import sys, serve.app, serve.predict_folder, serve.triton, stages.report; "
            "print(sorted({'torch', 'torchvision', 'timm'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
