"""The deploy model as the server and the folder predictor see it: a verified model card, an ONNX Runtime
session, and untrusted image bytes turned into network input by `stages.presets` (never by code of its own).

Torch-free: it imports the library's numpy/Pillow/ONNX Runtime part only (`stages.presets`, `stages.runtime`,
`stages.trust`, `stages.card`, `stages.config`), never a stage, so the serving image installs no torch,
torchvision or timm.
"""
import concurrent.futures
import dataclasses
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages import machine, presets, runtime, throughput, trust
from stages.card import read_card
from stages.config import UserError

# Decoders reachable from the network. PIL has riskier ones (EPS runs Ghostscript); these cover cameras and web.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


@dataclasses.dataclass(frozen=True)
class Params:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 0           # images per ONNX Runtime call at most; 0: from the card (see `policy`)
    max_wait_ms: float = 5.0          # longest an image waits for others to fill its batch
    threads: int = 0                  # ONNX Runtime intra-op threads per lane; 0: from the card
    lanes: int = 0                    # ONNX Runtime calls at once, each on a runner of its own; 0: from the card
    decode_threads: int = 0           # decode threads in each of the two pools (photos, big images); 0: a third
                                      # of the cores (the folder predictor, which does not overlap them: all)
                                      # decode is ~a quarter of an image's CPU (4.3 of 17.7 ms, Lite0 at 256 px);
                                      # on 2 cores a second photo decode thread cost the server 12 % of its rate
    top_k: int = 3
    max_body_bytes: int = 10_000_000  # per request
    max_images: int = 16              # per request
    max_pixels: int = 40_000_000      # per image, read from its header before decoding (~120 MB as RGB)
    max_request_pixels: int = 80_000_000  # per request, summed over its images' headers before any is decoded
    max_decode_queue: int = 64        # images queued or decoding; a request that would pass it gets 503
    fast_lane_pixels: int = 4_000_000  # images up to this size decode on threads of their own: never behind bombs
    max_connections: int = 64         # /predict requests in progress (nginx limit_conn); beyond it, 503
    max_sockets: int = 1024           # open client sockets (nginx worker_connections), idle ones included
    header_timeout_s: float = 5.0     # to receive the request line and headers; also ends silent sockets
    max_header_bytes: int = 32_768    # request line and headers; beyond, 431 (a single line: a quarter of it)
    read_timeout_s: float = 30.0      # to receive a whole body (408); nginx also ends a body that stalls this long
    keep_alive_s: float = 75.0        # idle connections stay open this long: above any client's or balancer's
    batch_size: int = 0               # batch prediction (serve/batch.py): images per ONNX Runtime call; 0: the
    #                                   card's fastest for lanes of `batch_threads` on this CPU (else 8; 32 on a GPU)
    batch_actors: int = 0             # ONNX Runtime actors; 0: one a machine, with a lane (a call at a time) per
    #                                   `batch_threads` CPUs (one per GPU on GPUs)
    batch_threads: int = 1            # intra-op threads per lane; an actor holds this many of Ray's CPUs a lane
    batch_part_rows: int = 1000       # results per part file: what a crash can cost at most

    def __post_init__(self):
        for name in ("max_batch_size", "threads", "lanes", "decode_threads", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (from the card) or a positive integer, not {getattr(self, name)!r}")
        for name in ("top_k", "max_body_bytes", "max_images",
                     "max_pixels", "max_request_pixels", "max_decode_queue", "fast_lane_pixels",
                     "max_connections", "max_sockets", "max_header_bytes", "batch_threads",
                     "batch_part_rows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, not {getattr(self, name)!r}")
        if self.max_wait_ms < 0 or min(self.read_timeout_s, self.keep_alive_s, self.header_timeout_s) <= 0:
            raise ValueError(f"max_wait_ms must be >= 0, read_timeout_s, keep_alive_s and header_timeout_s > 0, "
                             f"not {self.max_wait_ms}, {self.read_timeout_s}, {self.keep_alive_s}, "
                             f"{self.header_timeout_s}")
        if not isinstance(self.batch_actors, int) or self.batch_actors < 0:
            raise ValueError(f"batch_actors must be 0 (auto) or a positive integer, not {self.batch_actors!r}")
        if self.max_header_bytes < 4096:
            raise ValueError(f"max_header_bytes must be at least 4096, not {self.max_header_bytes}")


class InputError(Exception):
    """A request refused with a JSON error: HTTP `status`, a stable `kind` for metrics, a one-line `detail`."""

    def __init__(self, status, kind, detail):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


def policy(card, lanes=0, cores=None):
    """({"max_batch_size", "lanes", "threads"}, where they came from): the fastest setting (with `lanes` lanes,
    if not 0) the deploy stage measured for the card's model (`stages.throughput`, card "serving"), if it
    measured on this CPU with this many cores; otherwise one lane on every core at batch 8 (a middle ground:
    the sweep has not been run here)."""
    cores, m = cores or throughput.cores(), card.get("serving") or {}
    built = card.get("built_on")
    best = max((s for s in m.get("settings", []) if lanes in (0, s["lanes"])), key=lambda s: s["img_s"], default=None)
    if best and m.get("cores") == cores and built and not machine.differences(built):
        return ({"max_batch_size": best["batch"], "lanes": best["lanes"], "threads": best["threads"]},
                f"the deploy stage's measurement on this CPU ({best['img_s']} img/s in process)")
    why = "the card has no serving measurement" if not best else \
        f"the card's serving measurement is of {machine.describe(built)} with {m.get('cores')} usable cores"
    return {"max_batch_size": 8, "lanes": 1, "threads": cores}, f"defaults: {why}"


class Model:
    """A card's model: ONNX Runtime runners (a batch-1 and a dynamic session each; one per lane), class names,
    preprocessing and the trust settings (temperature, abstention and out-of-distribution thresholds) from the
    ONNX metadata. `threads` or `lanes` 0: the card's `policy`; `dynamic` False: runners for one image a call
    (`runtime.Runner`)."""

    def __init__(self, card_path, threads, lanes=1, dynamic=True):
        self.card = read_card(card_path)
        self.policy, self.policy_source = policy(self.card, lanes)
        self.threads, lanes = threads or self.policy["threads"], lanes or self.policy["lanes"]

        def runner(_):                          # decoders share the cores: no spinning
            return runtime.Runner(self.card["model"], self.threads, spinning=False, dynamic=dynamic)

        try:                                    # a file cut short still has the card's SHA if the card was made from it
            # made at once: ONNX Runtime releases the GIL for part of it (4 sessions: 0.16-0.18 s against 0.25-0.27
            # s one after another, 2 cores, Intel Xeon AVX-512)
            with concurrent.futures.ThreadPoolExecutor(lanes) as pool:
                self.runners = list(pool.map(runner, range(lanes)))
        except Exception as e:                  # ONNX Runtime's own types (InvalidProtobuf, Fail, ...)
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise UserError(f"{self.card['model']} is not a model ONNX Runtime can load: {reason[:300]}") from None
        self.infer = self.runners[0]
        self.sess = self.infer.single
        try:
            self.classes, self.pp = runtime.metadata(self.sess)
        except KeyError as e:
            raise UserError(f"{self.card['model']} lacks the metadata {e} that stages.export writes") from None
        self.transform = presets.eval_transform(self.pp).array    # numpy out: no torch
        self.trust = trust.Trust.from_metadata(self.sess.get_modelmeta().custom_metadata_map)
        names = [o.name for o in self.sess.get_outputs()]          # logits first; `ood_score` in a shipped file
        self.ood_output = names.index(runtime.OOD) if runtime.OOD in names else None
        built = self.card.get("built_on")
        diff = machine.differences(built) if built else []
        self.cpu_warning = (f"warning: the deploy stage chose and timed {self.card['variant']} on "
                            f"{machine.describe(built)}; this machine is {machine.describe()} ({'; '.join(diff)}): "
                            "INT8 against FP32 may rank otherwise here; re-run `dvc repro -f deploy` on this machine "
                            "to check") if diff else None

    def resolve(self, p):
        """Params `p` with its 0s (from the card) filled in as this model runs them."""
        return dataclasses.replace(p, max_batch_size=p.max_batch_size or self.policy["max_batch_size"],
                                   threads=self.threads, lanes=len(self.runners),
                                   decode_threads=p.decode_threads or max(1, throughput.cores() // 3))

    def warm(self, batch):
        """Run a batch of one and one of `batch` zero images on every runner: ONNX Runtime grows its memory
        arena to the largest shape it has seen, so a server warmed at its largest batch reaches its steady memory
        at start-up (and its first real requests pay no allocation) instead of growing under the first burst."""
        x = np.zeros((batch, 3, self.pp.input_size, self.pp.input_size), np.float32)
        for run in self.runners:
            run(x[:1])
            if batch > 1:
                run(x)

    def probabilities(self, logits):
        """(n, classes) logits -> calibrated probabilities (softmax at the model's temperature), float64: the
        one probability path of the server and batch prediction."""
        return trust.probabilities(logits, self.trust.temperature)

    def outputs(self, x):
        """(n, 3, H, W) network input -> the file's outputs (logits, and `ood_score` where it has one)."""
        return self.infer.run(x)

    def decide(self, outputs):
        """(probabilities, reasons) for the file's outputs on n images (`outputs`): reasons[i] None (answered),
        "out_of_distribution" or "low_confidence" (see `stages.trust.decide`)."""
        return trust.decide(outputs[0], self.trust, None if self.ood_output is None else outputs[self.ood_output])

    def info(self):
        """What a client may know: no file paths."""
        meta = self.sess.get_modelmeta().custom_metadata_map
        return {"classes": self.classes, "variant": self.card["variant"], "backbone": meta.get("backbone"),
                "version": {"git_rev": self.card.get("git_rev"), "dvc_md5": self.card.get("dvc_md5"),
                            "sha256": self.card["sha256"]},
                "input_size": self.pp.input_size, "preprocessing": dataclasses.asdict(self.pp),
                "trust": {k: v if np.isfinite(v) else None for k, v in dataclasses.asdict(self.trust).items()}}


def open_image(data, max_pixels):
    """Image bytes -> a PIL image whose header alone has been read, within `max_pixels`; InputError otherwise."""
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
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise InputError(413, "image_too_large", f"the image is {width}x{height} = {width * height:,} "
                                                 f"pixels; the limit is {max_pixels:,}")
    return im


def decode(im, transform):
    """An opened image -> (3, H, W) float32 network input (`transform`: PIL image -> numpy array); InputError if
    its pixels cannot be decoded."""
    with im:
        try:
            rgb = presets.to_rgb(im)
        except Exception as e:
            raise InputError(400, "corrupt_image", f"the image cannot be decoded: {e}") from None
    return np.asarray(transform(rgb))    # a torch tensor too (EvalTransform itself), as numpy


def preprocess(data, transform, max_pixels):
    """Image bytes -> (3, H, W) float32 network input; InputError for anything but a sane image."""
    return decode(open_image(data, max_pixels), transform)


def top_k(probs, classes, k):
    """[{"class", "probability"}] for the `k` most probable classes, most probable first."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"class": classes[i], "probability": float(probs[i])} for i in order]
