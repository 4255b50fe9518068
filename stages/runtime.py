"""ONNX Runtime as the pipeline and the server run it, and the worker that times one model in a process of its own.

Kept free of torch and timm imports: a serving or timing process that runs an ONNX file starts in a fraction of
a second.
"""
import time
from pathlib import Path

import onnxruntime as ort

BATCH = "batch"          # the name of the ONNX model's dynamic batch axis


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


class Runner:
    """Runs an ONNX model on any batch: a batch-1 session for single images, the dynamic one otherwise."""

    def __init__(self, path, threads=0, spinning=True):
        self.sess = session(path, threads, spinning)
        self.single = session(path, threads, spinning, batch=1)
        self.input = self.sess.get_inputs()[0].name

    def __call__(self, x):
        """(n, 3, H, W) float32 -> (n, classes) logits."""
        return (self.single if len(x) == 1 else self.sess).run(None, {self.input: x})[0]


_model = None            # the timing worker's model: one per process


def load(path, threads):
    """Timing worker's initializer: an ONNX file through `Runner`, any other file as a PyTorch checkpoint run
    eagerly (in eval mode, under `torch.inference_mode()`)."""
    global _model
    if Path(path).suffix == ".onnx":
        _model = Runner(path, threads)
        return
    import torch
    from stages.prune import load_model         # train's checkpoints and prune's alike

    torch.set_num_threads(threads)
    model = load_model(path)[0]

    def eager(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    _model = eager


def calls(x, n):
    """Seconds taken by each of `n` calls of the worker's model on `x`."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        _model(x)
        out.append(time.perf_counter() - t)
    return out
