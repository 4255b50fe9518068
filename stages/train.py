"""train: transfer a pretrained backbone to the manifest's classes.

Strategies: `linear_probe` (frozen body: its features are computed once and the head trains on that cache),
`finetune` (all weights), `lp_ft` (the head first, then everything at a lower backbone learning rate).
Model selection (whether fine-tuning earned its place; with `select: best`, the fine-tune epoch) uses the
manifest's `holdout` slice of train; `val` is never seen here. With `workers > 1` the same recipe (`fit`) runs
data-parallel on Ray Train (stages/distributed.py); the input pipeline is stages/loading.py.
"""
import copy
import csv
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T
from tqdm import tqdm

from stages import backbones, presets
from stages.checkpoint import save_checkpoint
from stages.config import UserError, atomic_write, cli, load_section, parser, stage_device
from stages.loading import (SOLO, autocast, class_weights, loader, loader_workers, predict, save_grid,
                            to_device)
from stages.manifest import read_manifest, read_paths
from stages.probe import choose_c, earned, fit_probe, head_logits, set_head

STRATEGIES = ("linear_probe", "finetune", "lp_ft")
BALANCES = ("none", "sampler", "loss")
MIXES = {"none": None, "mixup": T.MixUp, "cutmix": T.CutMix}


@dataclasses.dataclass(frozen=True)
class Params:
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"          # imagenet | none | path/to/checkpoint.pt
    strategy: str = "lp_ft"
    seed: int = 0
    batch_size: int = 32
    dropout: float = 0.2
    label_smoothing: float = 0.1
    weight_decay: float = 1e-4
    lp_cs: tuple = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)   # probe: inverse L2 strengths
    lp_folds: int = 5                  # cross-validation folds over train + holdout that choose among lp_cs
    lp_views: int = 1                  # 1 + augmented views per image, besides probe_views' deterministic ones
    ft_epochs: int = 3
    ft_lr: float = 1e-3                # head learning rate while fine-tuning
    ft_backbone_lr: float = 1e-4
    select: str = "last"               # last | best: which fine-tune epoch to keep (see README: why last)
    ft_margin_se: float = 2.0          # lp_ft keeps fine-tuning only if it beats the probe on holdout by this
                                       # many standard errors of the paired difference (`earned`)
    patience: int = 0                  # stop after this many epochs without holdout improvement; 0: off
    crop_scale: tuple = (0.35, 1.0)
    test_size: int = 0                 # px seen at test time (and by the linear probe); 0: the backbone's own
    hflip: float = 0.5
    policy: str = "trivialaugment"     # none | trivialaugment | randaugment
    mix: str = "none"                  # none | mixup | cutmix, on fine-tune batches
    balance: str = "none"              # none | sampler | loss: counter class imbalance
    workers: int = 1                   # data-parallel Ray Train workers; 1: this process alone, no Ray
    loader_workers: int = -1           # DataLoader processes per training process; -1: by the cores

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise UserError(f"train.strategy '{self.strategy}' is not one of {', '.join(STRATEGIES)}")
        for key, allowed in (("select", ("last", "best")), ("mix", tuple(MIXES)), ("balance", BALANCES)):
            if getattr(self, key) not in allowed:
                raise UserError(f"train.{key} '{getattr(self, key)}' is not one of {', '.join(allowed)}")
        presets.get_policy(self.policy)
        if not self.lp_cs or min(self.lp_cs) <= 0:
            raise UserError(f"train.lp_cs must be a non-empty list of positive numbers, not {self.lp_cs}")
        if self.workers < 1 or self.batch_size % self.workers:
            raise UserError(f"train.workers must be at least 1 and divide train.batch_size ({self.batch_size}), "
                            f"not {self.workers}: the global batch stays batch_size, batch_size / workers each")
        if self.loader_workers < -1:
            raise UserError(f"train.loader_workers must be -1 (one per spare core), 0 or more, "
                            f"not {self.loader_workers}")


def eval_loader(rows, classes, pp, p, device, shard=SOLO, transform=None, seed=0):
    """This process's share of `rows` in order, under the eval transform (or `transform`), decoded from the original
    files: the probe and the holdout choices see the pixels evaluate and the server see. prepare's cached copies
    (downscaled, re-encoded) are for the fine-tune epochs; the probe lost accuracy on them (the README's table
    across data sets)."""
    return loader(rows, classes, transform or presets.eval_transform(pp), p.batch_size, seed=seed, column="path",
                  workers=loader_workers(p.loader_workers, shard.cpus, device), device=device, shard=shard)


def freeze_bn(model):
    """Keep BatchNorm statistics at their pretrained values: a few hundred images would only add noise."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def holdout_score(logits, labels):
    """(accuracy, -loss): the model selected is the most accurate on holdout, the most confident on ties."""
    return (round((logits.argmax(1) == labels).float().mean().item(), 6), -F.cross_entropy(logits, labels).item())


def probe_features(model, rows, classes, p, device, views, shard=SOLO):
    """Body features of `rows` under each transform in `views`: (x [views*n, d] float64, y [views*n], image
    index), view by view, so that every image's first view comes first and in order, as stages.probe wants them.
    Held once as float32 per view and once as the float64 result: 12 bytes per image, view and feature."""
    feats = [predict(model.body, eval_loader(rows, classes, None, p, device, shard, tf, p.seed + i), device,
                     f"train: features, view {i + 1}/{len(views)}" if len(rows) > 64 else None, shard)
             for i, tf in enumerate(views)]
    x = np.concatenate([f.numpy() for f, _ in feats], dtype=np.float64)
    return x, np.concatenate([y.numpy() for _, y in feats]), np.tile(np.arange(len(rows)), len(views))


def probe_views(pp, p):
    """The transforms whose features the probe fits, the plain view (the eval transform at `pp`'s size) first:
    its mirror where training flips (`hflip` > 0); the same again at the training crops' size where `pp` tests at
    another; then `lp_views` - 1 augmented views. The deterministic views are pictures the model may meet at test
    time, no augmentation policy's distortions (measured against the plain view alone: the README's table across
    data sets)."""
    sizes = [pp] + ([pp.at_size(pp.train_size)] if pp.train_size and pp.train_size != pp.input_size else [])
    plain = [presets.eval_transform(s) for s in sizes]
    return plain + ([presets.Mirrored(v) for v in plain] if p.hflip > 0 else []) + \
        [presets.train_transform(pp, p.crop_scale, p.hflip, p.policy)] * (p.lp_views - 1)


def linear_probe(model, train_rows, hold_rows, classes, views, p, device, shard=SOLO):
    """The head as a logistic regression on cached body features (`views` of every image), its regularisation
    chosen by k-fold cross-validation on train + holdout. The model gets the head fitted on train alone: it scores
    holdout honestly and is where fine-tuning starts. Returns the history row, that head's holdout logits, and the
    (weight, bias) refitted on train + holdout: the probe to keep when the body stays frozen, evaluate's baseline."""
    n, end = len(train_rows), len(train_rows) + len(hold_rows)
    x, y, image = probe_features(model, train_rows + hold_rows, classes, p, device, views, shard)
    c, cv = choose_c(x, y, image, p)
    w, b = fit_probe(x[image < n], y[image < n], c, p.balance != "none")
    hold_logits = head_logits(x[n:end], w, b)                  # holdout's plain views
    score = holdout_score(hold_logits, torch.tensor(y[n:end]))
    set_head(model.head, w.to(device), b.to(device))
    row = {"phase": "linear_probe", "epoch": 0, "train_loss": "", "holdout_loss": round(-score[1], 4),
           "holdout_acc": round(score[0], 4), "lp_views": len(views), **cv}
    shard.say(f"train: linear probe C={c} cross-validated accuracy {cv.get('cv_acc', '-')} (+/- "
              f"{cv.get('cv_acc_std', '-')} over {cv['cv_folds']} folds, {len(views)} views), "
              f"holdout {row['holdout_acc']}")
    return row, hold_logits, fit_probe(x, y, c, p.balance != "none")


def finetune(model, train_rows, hold_rows, classes, pp, p, device, start, history, shard=SOLO):
    """Train all weights, the body at a lower rate; keep the last epoch, or the best on holdout."""
    train_dl = loader(train_rows, classes, presets.train_transform(pp, p.crop_scale, p.hflip, p.policy),
                      p.batch_size, shuffle=True, seed=p.seed, column="cached", balanced=p.balance == "sampler",
                      workers=loader_workers(p.loader_workers, shard.cpus, device), device=device, shard=shard, pad=True)
    weight = class_weights(train_rows, classes).to(device) if p.balance == "loss" else None
    mix = MIXES[p.mix](num_classes=len(classes)) if MIXES[p.mix] else None
    hold_dl = eval_loader(hold_rows, classes, pp, p, device, shard)
    opt = torch.optim.AdamW([{"params": model.body.parameters(), "lr": p.ft_backbone_lr},
                             {"params": model.head.parameters(), "lr": p.ft_lr}], weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, p.ft_epochs * len(train_dl))
    trained = shard.wrap(model)          # the same parameters; under DDP its gradients are averaged
    best, best_state, stale = start, None, 0
    if p.select == "best":
        best_state = copy.deepcopy(model.state_dict())
    for epoch in range(1, p.ft_epochs + 1):
        row = {"phase": "finetune", "epoch": epoch,
               **train_one_epoch(trained, train_dl, opt, sched, mix, weight, p, device, epoch, shard)}
        score = holdout_score(*predict(model, hold_dl, device, shard=shard))
        history.append({**row, "holdout_loss": round(-score[1], 4), "holdout_acc": round(score[0], 4)})
        shard.say(f"train: epoch {epoch} " + " ".join(f"{k}={v}" for k, v in history[-1].items()
                                                       if k not in ("phase", "epoch")))
        if score > best:
            best, stale = score, 0
            if p.select == "best":
                best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if p.patience and stale >= p.patience:
                shard.say(f"train: early stop, holdout score has not improved for {stale} epochs")
                break
    if p.select == "best":
        model.load_state_dict(best_state)


def train_one_epoch(model, batches, opt, sched, mix, weight, p, device, epoch, shard=SOLO):
    """One pass over `batches`; returns train_loss, images/s and the seconds spent waiting for the loader,
    over every process (`loader_wait_s` near `seconds`: the input pipeline is the bottleneck)."""
    model.train()
    if p.weights != "none":              # pretrained statistics are worth keeping; a fresh net needs its own
        freeze_bn(model)
    t0, wait, total, n = time.perf_counter(), 0.0, 0.0, 0
    tick = t0
    for x, y in tqdm(batches, desc=f"train: fine-tune epoch {epoch}/{p.ft_epochs}", unit="batch",
                     disable=shard.rank > 0):
        wait += time.perf_counter() - tick
        if mix:
            x, y = mix(x, y)                # soft targets
        with autocast(device):
            loss = F.cross_entropy(model(to_device(x, device)), y.to(device), weight=weight,
                                   label_smoothing=p.label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        total, n = total + loss.item() * len(y), n + len(y)
        tick = time.perf_counter()
    seconds = time.perf_counter() - t0
    total, n, wait = shard.gather(torch.tensor([[total, n, wait]], dtype=torch.float64)).sum(0).tolist()
    row = {"train_loss": round(total / n, 4), "seconds": round(seconds, 1), "images_per_s": round(n / seconds, 1),
           "loader_wait_s": round(wait / shard.world, 1)}
    if str(device).startswith("cuda"):                  # this process's peak, the first GPU's under DDP
        row["gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20)
    return row


def run(manifest, out_dir, p, device="cpu", exclude=()):
    """Train on the manifest's train split, select on holdout; write model.pt, history.csv and augmented.png.
    `exclude`: image paths to leave out (the labels stage's suspects under `labels.label_issue: drop`)."""
    t0 = time.perf_counter()
    train_rows, classes = read_manifest(manifest, {"train"}, exclude)
    hold_rows, _ = read_manifest(manifest, {"holdout"}, exclude)
    if not train_rows or not hold_rows:
        raise UserError(f"{manifest}: train needs images in both the train and holdout splits")
    if p.workers > 1:
        from stages import distributed          # Ray is imported, and started, only when asked for
        ckpt, history = distributed.fit(train_rows, hold_rows, classes, p, device)
    else:
        ckpt, history = fit(train_rows, hold_rows, classes, p, device)
    out = Path(out_dir)
    pp = presets.Preprocessing.from_json(ckpt["preprocessing"])
    save_grid(train_rows, classes, presets.train_transform(pp, p.crop_scale, p.hflip, p.policy), pp, p.seed,
              out / "augmented.png")
    save_checkpoint(out / "model.pt", ckpt)
    atomic_write(out / "history.csv", lambda tmp: write_history(tmp, history))
    return {"seconds": round(time.perf_counter() - t0, 1), "history": history, "selection": ckpt["selection"]}


def fit(train_rows, hold_rows, classes, p, device="cpu", shard=SOLO):
    """The recipe: (checkpoint, history rows). Every process of a data-parallel run calls it with its `shard`;
    their decisions agree, as each sees every process's holdout predictions."""
    torch.manual_seed(p.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    model, pp = backbones.create(p.backbone, p.weights, len(classes), p.dropout)
    model.to(device)
    if str(device).startswith("cuda"):
        model.to(memory_format=torch.channels_last)
    pp = pp.at_size(p.test_size)
    history, t0, selection, extra = [], time.perf_counter(), {"kept": p.strategy}, {}
    start = (-1.0, 0.0)
    if p.strategy in ("linear_probe", "lp_ft"):
        row, probe_logits, probe = linear_probe(model, train_rows, hold_rows, classes, probe_views(pp, p), p,
                                                 device, shard)
        history.append({**row, "seconds": round(time.perf_counter() - t0, 1)})
        selection.update({k: v for k, v in row.items() if k.startswith(("cv_", "lp_"))},
                         probe_holdout_acc=row["holdout_acc"])
        start = (row["holdout_acc"], -row["holdout_loss"])
        extra["baseline"] = {"weight": probe[0], "bias": probe[1]}   # on the pretrained body: see evaluate
        if p.strategy == "linear_probe":
            set_head(model.head, *(t.to(device) for t in probe))
    if p.strategy in ("finetune", "lp_ft"):
        probe_state = copy.deepcopy(model.state_dict())
        finetune(model, train_rows, hold_rows, classes, pp, p, device, start, history, shard)
    if p.strategy == "lp_ft":
        ft_logits, labels = predict(model, eval_loader(hold_rows, classes, pp, p, device, shard), device, shard=shard)
        kept, numbers = earned(ft_logits, probe_logits, labels, p.ft_margin_se)
        selection.update(numbers, kept="finetune" if kept else "linear_probe")
        if kept:
            selection["why"] = (f"fine-tuning beat the probe on holdout by {numbers['holdout_gain']:+.4f} "
                                f"(> {p.ft_margin_se} x {numbers['holdout_gain_se']} standard error)")
        else:       # back to the pretrained body and the probe, refitted on train + holdout
            model.load_state_dict(probe_state)
            set_head(model.head, *(t.to(device) for t in probe))
            selection["why"] = (f"fine-tuning did not earn its place: holdout gain {numbers['holdout_gain']:+.4f}"
                                f" is not above {p.ft_margin_se} x {numbers['holdout_gain_se']} standard error")
        shard.say(f"train: kept {selection['kept']}: {selection['why']}")
    ckpt = {"model": {k: v.cpu().contiguous() for k, v in model.state_dict().items()}, "backbone": p.backbone,
            "classes": classes, "dropout": p.dropout, "preprocessing": pp.to_json(),
            "params": dataclasses.asdict(p), "selection": selection, **extra}
    return ckpt, history


HISTORY = ["phase", "epoch", "train_loss", "holdout_loss", "holdout_acc", "seconds", "images_per_s", "loader_wait_s",
           "gpu_mem_mb"]


def write_history(path, history):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, HISTORY, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)


def main():
    ap = parser(__doc__, "--manifest", "--out")
    ap.add_argument("--exclude", help="a CSV whose `path` column lists images to leave out (labels stage)")
    args = ap.parse_args()
    p = load_section(Params, "train")
    device = stage_device("train")
    print(f"train: {p.backbone} ({p.weights}), strategy {p.strategy}, device {device}")
    result = run(args.manifest, args.out, p, device, read_paths(args.exclude))
    print(f"train: done in {result['seconds']} s")


if __name__ == "__main__":
    cli(main)
