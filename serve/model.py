"""The deploy model as the server and the folder predictor see it: a verified model card, an ONNX Runtime
session, and untrusted image bytes turned into network input by `stages.presets` (never by code of its own).
"""
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages import export, presets, runtime
from stages.config import UserError, sha256

# Decoders reachable from the network. PIL has riskier ones (EPS runs Ghostscript); these cover cameras and web.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


@dataclasses.dataclass(frozen=True)
class Params:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32          # images per ONNX Runtime call
    max_wait_ms: float = 5.0          # longest an image waits for others to fill its batch
    threads: int = 2                  # ONNX Runtime intra-op threads
    decode_threads: int = 2           # threads decoding and preprocessing images
    top_k: int = 3
    max_body_bytes: int = 10_000_000  # per request
    max_images: int = 16              # per request
    max_pixels: int = 40_000_000      # per image, read from its header before decoding (~120 MB as RGB)
    max_connections: int = 64         # beyond it, 503: with max_body_bytes it bounds the memory held by bodies
    read_timeout_s: float = 30.0      # to receive a whole body: a slow client cannot hold a connection forever
    keep_alive_s: float = 75.0        # idle connections stay open this long: above any client's or balancer's

    def __post_init__(self):
        for name in ("max_batch_size", "threads", "decode_threads", "top_k", "max_body_bytes", "max_images",
                     "max_pixels", "max_connections"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, not {getattr(self, name)!r}")
        if self.max_wait_ms < 0 or self.read_timeout_s <= 0 or self.keep_alive_s <= 0:
            raise ValueError(f"max_wait_ms must be >= 0, read_timeout_s and keep_alive_s > 0, not "
                             f"{self.max_wait_ms}, {self.read_timeout_s} and {self.keep_alive_s}")


class InputError(Exception):
    """A request refused with a JSON error: HTTP `status`, a stable `kind` for metrics, a one-line `detail`."""

    def __init__(self, status, kind, detail):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


def read_card(path):
    """The model card as a dict, after checking that the file it names has the SHA-256 it records."""
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"model card {path} not found: build it with the export stage") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"model card {path} is not JSON: {e}") from None
    missing = [k for k in ("model", "sha256", "variant") if not isinstance(card, dict) or k not in card]
    if missing:
        raise UserError(f"model card {path} lacks {', '.join(missing)}")
    model = Path(card["model"])                 # relative to the project root, like every path in dvc.yaml
    if not model.is_file():
        raise UserError(f"model card {path} names {model}, which does not exist (run from the project root)")
    digest = sha256(model)
    if digest != str(card["sha256"]).lower():
        raise UserError(f"{model} has SHA-256 {digest} but the card {path} says {card['sha256']}: "
                        "refusing to serve a model the card does not describe")
    return card


class Model:
    """A card's model: ONNX Runtime sessions (batch 1 and dynamic), class names and preprocessing from the ONNX
    metadata."""

    def __init__(self, card_path, threads):
        self.card = read_card(card_path)
        self.infer = runtime.Runner(self.card["model"], threads, spinning=False)   # decoders share the cores
        self.sess = self.infer.sess
        try:
            self.classes, self.pp = export.metadata(self.sess)
        except KeyError as e:
            raise UserError(f"{self.card['model']} lacks the metadata {e} that stages.export writes") from None
        self.transform = presets.eval_transform(self.pp)

    def info(self):
        """What a client may know: no file paths."""
        meta = self.sess.get_modelmeta().custom_metadata_map
        return {"classes": self.classes, "variant": self.card["variant"], "backbone": meta.get("backbone"),
                "version": {"git_rev": self.card.get("git_rev"), "dvc_md5": self.card.get("dvc_md5"),
                            "sha256": self.card["sha256"]},
                "input_size": self.pp.input_size, "preprocessing": dataclasses.asdict(self.pp)}


def preprocess(data, transform, max_pixels):
    """Image bytes -> (3, H, W) float32 network input; InputError for anything but a sane image."""
    if not data:
        raise InputError(400, "empty_image", "the image is zero bytes")
    try:                                        # the header only: nothing is decoded yet
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InputError(400, "not_an_image",
                         f"not an image in a supported format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as e:
        raise InputError(413, "image_too_large", str(e)) from None
    except Exception as e:                      # PIL raises many types on malformed headers
        raise InputError(400, "corrupt_image", f"the image header cannot be read: {e}") from None
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise InputError(413, "image_too_large", f"the image is {width}x{height} = {width * height:,} "
                                                     f"pixels; the limit is {max_pixels:,}")
        try:
            rgb = presets.to_rgb(im)
        except Exception as e:
            raise InputError(400, "corrupt_image", f"the image cannot be decoded: {e}") from None
    return transform(rgb).numpy()


def softmax(logits):
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def top_k(probs, classes, k):
    """[{"class", "probability"}] for the `k` most probable classes, most probable first."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"class": classes[i], "probability": float(probs[i])} for i in order]
