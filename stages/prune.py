"""prune: remove whole channels from the trained checkpoint (torch-pruning), then recover.

Structured pruning shrinks every tensor, so the smaller network runs faster anywhere, ONNX Runtime included;
torch-pruning's dependency graph keeps residual adds, depthwise convs and the classifier's input consistent.
`scope: hidden` prunes only the channels inside residual blocks (the expansion of inverted residuals, the middle
of ResNet blocks) and keeps the narrow residual streams whole: on Lite0, pruning the streams too at 0.25 left
a model no better than chance on holdout, even after BatchNorm recalibration and a new head.
Recovery: BatchNorm statistics recomputed on train (pruning changes every layer's input), the head refit on the
pruned features (train's linear probe), then train's fine-tune; like training it selects on holdout, and val
is never seen here. The checkpoint is train's format plus `pruning`: the widths `checkpoint.load_model` rebuilds.
"""
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from stages import presets, train
from stages.checkpoint import load_checkpoint, load_model, save_checkpoint, saved_params, widths
from stages.config import UserError, atomic_text, cli, load_section, parser, stage_device
from stages.manifest import read_manifest, read_paths

SCOPES = ("hidden", "all")
IMPORTANCES = {
    "magnitude": lambda: tp.importance.MagnitudeImportance(p=2),   # L2 norm of each channel group's weights
    "lamp": lambda: tp.importance.LAMPImportance(p=2),
    "fpgm": lambda: tp.importance.FPGMImportance(p=2),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
}


@dataclasses.dataclass(frozen=True)
class Params:
    ratio: float = 0.25             # channels removed per layer, 0..1 (the classifier's outputs never)
    scope: str = "hidden"           # hidden: only inside residual blocks | all: residual streams too
    importance: str = "magnitude"   # magnitude | lamp | fpgm | bn_scale: which channels go
    round_to: int = 8               # keep widths multiples of this (SIMD-friendly); 0: off
    epochs: int = 2                 # recovery fine-tune epochs; 0: none
    lr: float = 1e-3                # head, during recovery
    backbone_lr: float = 1e-4       # body, during recovery
    seed: int = 0

    def __post_init__(self):
        get_importance(self.importance)
        if self.scope not in SCOPES:
            raise UserError(f"prune.scope '{self.scope}' is not one of {', '.join(SCOPES)}")
        if not 0 <= self.ratio < 1:
            raise UserError(f"prune.ratio must be in [0, 1), not {self.ratio}")


def get_importance(name):
    if name not in IMPORTANCES:
        raise UserError(f"prune.importance '{name}' is not one of {', '.join(IMPORTANCES)}")
    return IMPORTANCES[name]()


def stream_layers(model):
    """The convs that write a residual stream (each block's last), in timm's EfficientNet/MobileNet blocks and
    torchvision's ResNet blocks; torch-pruning then leaves every channel group they belong to alone."""
    from timm.models import _efficientnet_blocks as timm_blocks
    from torchvision.models.resnet import BasicBlock, Bottleneck

    last = ((timm_blocks.InvertedResidual, "conv_pwl"), (timm_blocks.EdgeResidual, "conv_pwl"),
            (timm_blocks.DepthwiseSeparableConv, "conv_pw"), (timm_blocks.ConvBnAct, "conv"),
            (BasicBlock, "conv2"), (Bottleneck, "conv3"))
    return [getattr(m, name) for m in model.modules() for cls, name in last if isinstance(m, cls)]


def prune(model, input_size, p):
    """Prune `model` in place at `p.ratio`, never the classifier's outputs; (MACs, params) before and after."""
    x = torch.zeros(1, 3, input_size, input_size)
    before = tp.utils.count_ops_and_params(model, x)
    ignored = [model.head]
    if p.scope == "hidden":
        streams = stream_layers(model)
        if not streams:
            raise UserError("prune.scope hidden knows timm's EfficientNet/MobileNet blocks and torchvision's "
                            "ResNet blocks; this backbone has neither: set prune.scope: all")
        ignored += streams
    pruner = tp.pruner.MetaPruner(model.eval(), x, get_importance(p.importance), pruning_ratio=p.ratio,
                                  ignored_layers=ignored, round_to=p.round_to or None)
    pruner.step()
    return before, tp.utils.count_ops_and_params(model, x)


@torch.no_grad()
def recalibrate_bn(model, batches, device):
    """BatchNorm running statistics recomputed from scratch over `batches` (a cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x, _ in batches:
        model(x.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def holdout_score(model, batches, device):
    """(accuracy, -loss) on holdout: the order `train.finetune` selects by."""
    return train.holdout_score(*train.predict(model, batches, device))


def run(checkpoint, manifest, out_dir, p, device="cpu", exclude=()):
    """Prune the checkpoint, recover on train (selecting on holdout); write model.pt and report.json.
    `exclude`: image paths to leave out, as train left them out (`labels.label_issue: drop`)."""
    train_rows, _ = read_manifest(manifest, {"train"}, exclude)
    hold_rows, _ = read_manifest(manifest, {"holdout"}, exclude)
    if not train_rows or not hold_rows:
        raise UserError(f"{manifest}: prune needs images in both the train and holdout splits")
    torch.manual_seed(p.seed)
    ckpt = load_checkpoint(checkpoint)
    model, classes, pp = load_model(ckpt)
    hold = train.loader(hold_rows, classes, presets.eval_transform(pp), 32)     # the originals, as train scores
    acc = {"before": holdout_score(model.to(device), hold, device)[0]}
    (macs0, params0), (macs1, params1) = prune(model.cpu(), pp.input_size, p)
    pruned = holdout_score(model.to(device), hold, device)
    acc["pruned"] = pruned[0]
    t0 = time.perf_counter()
    recalibrate_bn(model, train.loader(train_rows, classes, presets.eval_transform(pp), 32), device)
    acc["recalibrated"] = holdout_score(model, hold, device)[0]
    recovery = dataclasses.replace(saved_params(ckpt, train.Params), ft_epochs=p.epochs, ft_lr=p.lr,
                                   ft_backbone_lr=p.backbone_lr, select="best", patience=0, seed=p.seed)
    history = [train.linear_probe(model, train_rows, hold_rows, classes, train.probe_views(pp, recovery), recovery,
                                  device)[0]]
    if p.epochs:        # "best" against the refit head's score: epochs that do not help on holdout are not kept
        start = (history[0]["holdout_acc"], -history[0]["holdout_loss"])
        train.finetune(model, train_rows, hold_rows, classes, pp, recovery, device, start, history)
    acc["recovered"] = holdout_score(model, hold, device)[0]
    model.cpu()
    out = {**ckpt, "model": {k: v.cpu() for k, v in model.state_dict().items()},
           "pruning": {"widths": widths(model), "params": dataclasses.asdict(p)}}
    save_checkpoint(Path(out_dir) / "model.pt", out)
    report = {"ratio": p.ratio, "importance": p.importance, "params_before": int(params0),
              "params_after": int(params1), "params_kept": round(params1 / params0, 4), "macs_before": int(macs0),
              "macs_after": int(macs1), "macs_kept": round(macs1 / macs0, 4),
              **{f"holdout_acc_{k}": v for k, v in acc.items()},
              "recovery_seconds": round(time.perf_counter() - t0, 1), "recovery": history}
    atomic_text(Path(out_dir) / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def main():
    ap = parser(__doc__, "--checkpoint", "--manifest", "--out")
    ap.add_argument("--exclude", help="a CSV whose `path` column lists images to leave out (labels stage)")
    args = ap.parse_args()
    r = run(args.checkpoint, args.manifest, args.out, load_section(Params, "prune"), stage_device("prune"),
            read_paths(args.exclude))
    print(f"prune: params {r['params_before']:,} -> {r['params_after']:,} ({r['params_kept']:.0%}), MACs "
          f"{r['macs_before']:,} -> {r['macs_after']:,} ({r['macs_kept']:.0%}); holdout accuracy "
          f"{r['holdout_acc_before']} -> {r['holdout_acc_pruned']} pruned -> {r['holdout_acc_recalibrated']} "
          f"BatchNorm recalibrated -> {r['holdout_acc_recovered']} recovered")


if __name__ == "__main__":
    cli(main)
