"""ONNX Runtime as the pipeline and the server run it: sessions, the batch-aware runner, the ONNX file's metadata.

Kept free of torch, torchvision and timm imports (onnxruntime, numpy and the torch-free `presets` only): the
server, the folder predictor and a timing process that runs an ONNX file import this, and start in a fraction of
a second. A library module: it imports no stage (the timing worker, which loads checkpoints, is stages/timing.py).
"""
import json

import onnxruntime as ort

from stages.presets import Preprocessing

BATCH = "batch"          # the name of the ONNX model's dynamic batch axis
INPUT = "input"          # the name of the ONNX model's one input: (batch, 3, H, W) float32, what presets makes
OUTPUT = "logits"        # the name of its first output: (batch, classes)
FEATURES = "features"    # export's second output: the head's input, (batch, dim); the shipped file has none
OOD = "ood_score"        # the shipped file's second output, (batch, 1): larger is more out-of-distribution


def session(path, threads=0, spinning=True, batch=None):
    """An ONNX Runtime CPU session; `threads` 0 lets ONNX Runtime choose. A server that also decodes
    images turns `spinning` off: idle ORT threads would busy-wait on the cores the decoders need.
    `batch` fixes the dynamic batch axis: a session planned for one shape runs a single image about a
    quarter faster here than the dynamic one (best of 160 runs: 10.9 ms against 14.4 ms for Lite0 at 256 px)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if batch:
        opts.add_free_dimension_override_by_name(BATCH, batch)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def metadata(sess):
    """(class names, Preprocessing) from an ONNX session's metadata, as `stages.export` writes them; KeyError
    names the missing key."""
    meta = sess.get_modelmeta().custom_metadata_map
    return json.loads(meta["classes"]), Preprocessing.from_json(meta["preprocessing"])


class Runner:
    """Runs an ONNX model on any batch: a batch-1 session for single images, the dynamic one otherwise.
    `dynamic` False: the batch-1 session alone, for a caller whose every call is one image (a session takes 40-100 ms
    to make here)."""

    def __init__(self, path, threads=0, spinning=True, dynamic=True):
        self.single = session(path, threads, spinning, batch=1)
        self.sess = session(path, threads, spinning) if dynamic else None
        self.input = self.single.get_inputs()[0].name     # INPUT for this project's files; any name for others

    def run(self, x):
        """(n, 3, H, W) float32 -> the file's outputs, a list of arrays of n rows: logits first."""
        if len(x) != 1 and self.sess is None:
            raise ValueError(f"a batch of {len(x)} on a runner made for single images")
        return (self.single if len(x) == 1 else self.sess).run(None, {self.input: x})

    def __call__(self, x):
        """(n, 3, H, W) float32 -> (n, classes) logits."""
        return self.run(x)[0]
