"""train with `train.workers > 1`: the same recipe (`train.fit`) in data-parallel processes on Ray Train.

Ray Train's TorchTrainer starts `workers` processes (here, or on the cluster at RAY_ADDRESS: stages.cluster)
and joins them in one torch process group, gloo on CPU and NCCL when `devices.train` is cuda (a GPU each).
Each process runs `train.fit` with its `Shard`: its share of every batch (batch_size / workers images, the
gradients averaged by DistributedDataParallel, so the global batch and the schedule are the single process's)
and of every feature and prediction pass, joined for the probe's fit and for holdout selection. Rank 0's
checkpoint and history come back as the run's return value (Ray Train V2's `Result.return_value`): no
checkpoint goes through Ray's storage, so a multi-node cluster needs no shared file system, and `train.run`
writes the files exactly as for one process.
"""
import io
import os
import shutil
import tempfile

import torch

from stages.cluster import ray_init
from stages.config import UserError
from stages.loading import Shard


def fit(train_rows, hold_rows, classes, p, device):
    """`train.fit` on `p.workers` Ray Train workers: rank 0's (checkpoint, history). A failed worker is a
    UserError naming it and its error."""
    ray = ray_init()
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    gpu = str(device).startswith("cuda")
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // p.workers)
    storage = tempfile.mkdtemp(prefix="train-ray-")      # Ray Train's run records only; removed below
    trainer = TorchTrainer(
        worker, train_loop_config={"rows": (train_rows, hold_rows, classes), "p": p, "cpus": cpus,
                                   "cwd": os.getcwd()},
        scaling_config=ScalingConfig(num_workers=p.workers, use_gpu=gpu, resources_per_worker=(
            {"CPU": cpus, "GPU": 1} if gpu else {"CPU": cpus})),
        run_config=RunConfig(name="train", storage_path=storage,
                             failure_config=FailureConfig(max_failures=0)))   # a retry would start over
    print(f"train: {p.workers} Ray Train workers, {cpus} CPU{'s' * (cpus > 1)}{' + 1 GPU' * gpu} each, "
          f"{p.batch_size // p.workers} images per worker per batch")
    try:
        data, history = trainer.fit().return_value
    except TrainingFailedError as e:
        raise UserError(failure(e, p.workers)) from None
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), history


def worker(config):
    """One Ray Train worker: `train.fit` on its shard; rank 0 returns the result."""
    import ray.train
    import ray.train.torch

    from stages import train

    # Ray Train starts each worker in its run's artifacts folder (/tmp/ray/session_*/artifacts/...), where the
    # manifest's paths (relative to the project root, as `dvc repro` writes them) name nothing: work where the
    # stage runs, as one process does. On a cluster the checkout sits at the same path on every node (README).
    os.chdir(config["cwd"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config["cpus"])
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)       # all_gather_object over NCCL stages its bytes on this device
    ckpt, history = train.fit(*config["rows"], config["p"], device, Shard(rank, world, config["cpus"]))
    if rank == 0:           # Ray Train refuses to return tensors: the checkpoint as torch.save's bytes
        data = io.BytesIO()
        torch.save(ckpt, data)
        return data.getvalue(), history


def failure(error, workers):
    """One line for a failed run: each failed worker's rank and the last line of its error."""
    from ray.train import WorkerGroupError

    def last_line(e):
        return next((line for line in reversed(str(e).strip().splitlines()) if line.strip()), type(e).__name__)

    if isinstance(error, WorkerGroupError) and error.worker_failures:
        return "; ".join(f"train: Ray Train worker {rank} of {workers} failed: {type(e).__name__}: {last_line(e)}"
                         for rank, e in sorted(error.worker_failures.items()))
    return f"train: Ray Train failed: {last_line(error)}"
