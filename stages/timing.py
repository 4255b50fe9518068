"""The deploy stage's timing worker: one model per spawned process, an ONNX file or a PyTorch checkpoint.

Apart from `stages.runtime` so that the serving library imports no stage: only a checkpoint's timing imports
torch and `stages.prune`, inside `load`.
"""
import time
from pathlib import Path

from stages.runtime import Runner

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
