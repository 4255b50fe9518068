"""The input pipeline: manifest rows as batches, the same batches for any number of loader or training workers.

Each epoch's order (shuffled, or class-balanced draws) and each image's augmentation seed come from (seed, epoch,
position) alone, so the images and their augmentations do not change with `train.loader_workers` (DataLoader
processes) or `train.workers` (data-parallel processes: worker `rank` takes positions rank, rank + world, ...,
so its batch of B / world images is its share of the single-process batch of B).
"""
import contextlib
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from stages import presets
from stages.config import atomic_write

MAX_LOADER_WORKERS = 8       # decoding 320 px cached copies: a few processes feed one GPU


class Shard:
    """This process's share of the work: `rank` of `world` data-parallel processes (world 1: all of it)."""

    def __init__(self, rank=0, world=1, cpus=None):
        self.rank, self.world = rank, world
        self.cpus = cpus or len(os.sched_getaffinity(0))

    def gather(self, x):
        """Every process's rows of `x` (positions rank, rank + world, ...) joined back in position order."""
        if self.world == 1:
            return x
        parts = [None] * self.world
        dist.all_gather_object(parts, x.cpu())
        ref = max(parts, key=len)                           # a share may be empty (fewer rows than processes)
        out = torch.empty((sum(len(p) for p in parts), *ref.shape[1:]), dtype=ref.dtype)
        for r, part in enumerate(parts):
            if len(part):
                out[r::self.world] = part
        return out

    def say(self, text):
        """Print once, from the first process."""
        if self.rank == 0:
            print(text)

    def wrap(self, model):
        """The model as it trains: under DistributedDataParallel (its gradients averaged) when world > 1."""
        if self.world == 1:
            return model
        device = next(model.parameters()).device
        return torch.nn.parallel.DistributedDataParallel(model, [device] if device.type == "cuda" else None)


SOLO = Shard()


def loader_workers(requested, cpus, device="cpu"):
    """DataLoader processes: `requested`, or (-1) the cores this process may use beyond the training math's
    (one on CUDA, two on CPU), at most MAX_LOADER_WORKERS; 0 decodes in the training process. On 2 cores that
    is 0: a loader process there only competes with the math's threads (and took ~9 s to start under load)."""
    spare = cpus - (1 if str(device).startswith("cuda") else 2)
    return requested if requested >= 0 else max(0, min(MAX_LOADER_WORKERS, spare))


class ImageRows(Dataset):
    """Manifest rows as (tensor, class index); `column` names the file: `cached` copies or original `path`.

    Files and labels are numpy arrays, not the rows' dicts: a DataLoader process that reads a Python object
    writes its reference count, which copies its memory page, so a list of dicts ends up copied into every
    loader process (PyTorch issue 13246); numpy's byte strings stay shared."""

    def __init__(self, rows, classes, transform, column="path"):
        self.index = {c: i for i, c in enumerate(classes)}
        self.files = np.array([os.fsencode(r[column]) for r in rows], dtype=bytes)
        self.labels = np.array([self.index[r["label"]] for r in rows], dtype=np.int64)
        self.transform = transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        """`item`: (row index, seed of this image's augmentation), as `Order` yields them."""
        i, seed = item
        rng = torch.default_generator           # what torchvision's random transforms draw from
        saved = rng.get_state()                 # in the training process: its dropout stream is left alone
        rng.manual_seed(seed)                   # (13 us; torch.random.fork_rng took 850 us here)
        try:
            x = self.transform(presets.load_rgb(os.fsdecode(self.files[i])))
        finally:
            rng.set_state(saved)
        return x, int(self.labels[i])


class Order(Sampler):
    """(row index, augmentation seed) for this process's share of each epoch, drawn from (seed, epoch) alone.

    Written here because torch's DistributedSampler shards a permutation but neither weighted draws nor
    per-image seeds. `pad` repeats the epoch's first positions up to a multiple of `world`, so every process
    runs as many batches (DistributedDataParallel waits for all); without it (evaluation) nothing repeats."""

    def __init__(self, n, seed=0, shuffle=False, weights=None, shard=SOLO, pad=True):
        self.n, self.seed, self.shuffle, self.weights, self.shard, self.pad = n, seed, shuffle, weights, shard, pad
        self.epoch = 0
        self.total = math.ceil(n / shard.world) * shard.world if pad else n

    def __len__(self):
        return len(range(self.shard.rank, self.total, self.shard.world))

    def __iter__(self):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
        self.epoch += 1
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        else:
            order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(2 ** 62, (self.n,), generator=g)
        mine = torch.arange(self.shard.rank, self.total, self.shard.world) % max(self.n, 1)
        return zip(order[mine].tolist(), seeds[mine].tolist())


def class_weights(rows, classes):
    """Inverse class frequency, mean 1 over the rows."""
    counts = torch.tensor([sum(r["label"] == c for r in rows) for c in classes], dtype=torch.float)
    w = 1.0 / counts.clamp(min=1)
    return w * len(rows) / (w[[classes.index(r["label"]) for r in rows]].sum())


def loader(rows, classes, transform, batch_size, shuffle=False, seed=0, column="path", balanced=False,
           workers=0, device="cpu", shard=SOLO, pad=False):
    """Batches of this process's share of `rows` (`batch_size` is the global batch: each of `shard.world`
    processes gets batch_size / world), in order, shuffled, or (`balanced`) each class equally likely."""
    data = ImageRows(rows, classes, transform, column)
    weights = class_weights(rows, classes)[data.labels] if balanced else None
    order = Order(len(data), seed, shuffle, weights, shard, pad)
    return DataLoader(data, batch_size=max(1, batch_size // shard.world), sampler=order, num_workers=workers,
                      pin_memory=str(device).startswith("cuda"), persistent_workers=workers > 0)


def tensors(rows, classes, pp, batch_size):
    """Decoded, eval-preprocessed (x, y) batches, kept in memory: every model scored reads the same inputs."""
    return list(loader(rows, classes, presets.eval_transform(pp), batch_size))


@torch.no_grad()
def predict(model, batches, device, desc=None, shard=SOLO):
    """Logits (float32, CPU) and labels over `batches`, in order; with a `shard`, every process's joined.
    Full precision, no autocast, on every device: the probe and holdout selection see what export serves."""
    model.eval()
    out, labels = [], []
    for x, y in tqdm(batches, desc=desc, unit="batch", disable=desc is None or shard.rank > 0):
        out.append(model(to_device(x, device)).float().cpu())
        labels.append(y)
    if not out:                                         # this process's share is empty
        out, labels = [torch.empty(0)], [torch.empty(0, dtype=torch.long)]
    return shard.gather(torch.cat(out)), shard.gather(torch.cat(labels))


def save_grid(rows, classes, transform, pp, seed, path, n=16):
    """A PNG grid of `n` training samples under `transform`: what the model sees, for people to check."""
    from torchvision.utils import make_grid, save_image

    x, _ = next(iter(loader(rows, classes, transform, n, shuffle=True, seed=seed, column="cached")))
    mean, std = torch.tensor(pp.mean)[:, None, None], torch.tensor(pp.std)[:, None, None]
    grid = make_grid((x * std + mean).clamp(0, 1), nrow=4, padding=2)
    atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))


def to_device(x, device):
    """A batch on `device`: asynchronously from pinned memory, channels-last on CUDA (faster convolutions)."""
    if not str(device).startswith("cuda"):
        return x
    return x.to(device, non_blocking=True, memory_format=torch.channels_last)


def autocast(device):
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); full precision elsewhere."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
