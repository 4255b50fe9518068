"""Parts 1 and 2: the pipeline's train recipe against the classic tutorial loop, and transfer against training
from scratch, on the same manifest, side by side in one process, on the CPU.

The classic loop is PyTorch's transfer-learning tutorial as the issue states it: the same backbone and
preprocessing (stages.backbones, stages.presets), RandomResizedCrop + flip, Adam at 1e-3 on every weight,
BatchNorm in training mode, original files decoded every epoch, val accuracy after every epoch; it trains on
train + holdout (the tutorial has no holdout). The pipeline is `stages.train.run` with params.yaml's `train`.
"""
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.timing import pairwise, spread, wall
from stages import backbones, presets, train
from stages.scores import scores
from stages.checkpoint import load_model
from stages.manifest import read_manifest

# The tutorial's recipe: RandomResizedCrop's default scale, flip, Adam 1e-3, a plain Linear head. Its batch size
# is 4; here it is the pipeline's, so that the two differ in the recipe and not in the batch.
CLASSIC = {"crop_scale": (0.08, 1.0), "hflip": 0.5, "lr": 1e-3, "dropout": 0.0, "policy": "none"}
TARGET = 0.93       # val accuracy whose time-to-reach is reported


def val_accuracy(model, batches, classes):
    logits, labels = train.predict(model, batches, "cpu")
    return scores(logits.argmax(1), labels, classes)["accuracy"]


def val_loader(manifest, classes, pp, batch_size):
    rows, _ = read_manifest(manifest, {"val"})
    return train.loader(rows, classes, presets.eval_transform(pp), batch_size)


def classic(manifest, backbone, weights, epochs, batch_size, seed=0):
    """The tutorial loop; per epoch: train loss, val accuracy, seconds training and evaluating, wall so far."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rows, classes = read_manifest(manifest, {"train", "holdout"})
    model, pp = backbones.create(backbone, weights, len(classes), CLASSIC["dropout"])
    tf = presets.train_transform(pp, CLASSIC["crop_scale"], CLASSIC["hflip"], CLASSIC["policy"])
    train_dl = train.loader(rows, classes, tf, batch_size, shuffle=True, seed=seed)
    val_dl = val_loader(manifest, classes, pp, batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=CLASSIC["lr"])
    history = []
    for epoch in range(1, epochs + 1):
        t1, total, n = time.perf_counter(), 0.0, 0
        model.train()
        for x, y in train_dl:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(y), n + len(y)
        t2 = time.perf_counter()
        acc = val_accuracy(model, val_dl, classes)
        history.append({"epoch": epoch, "train_loss": round(total / n, 4), "val_acc": acc,
                        "train_s": round(t2 - t1, 2), "eval_s": round(time.perf_counter() - t2, 2),
                        "wall_s": round(time.perf_counter() - t0, 2)})
        print(f"bench: classic ({weights}) epoch {epoch}/{epochs} val_acc={acc} wall={history[-1]['wall_s']} s")
    return {"wall_s": time.perf_counter() - t0, "history": history, "train_images": len(rows)}


def pipeline(manifest, out, p):
    """`stages.train.run` timed from the outside, then its checkpoint scored on val with the eval transform."""
    result, seconds = wall(train.run, manifest, out, p, "cpu")
    model, classes, pp = load_model(Path(out) / "model.pt")
    acc = val_accuracy(model, val_loader(manifest, classes, pp, p.batch_size), classes)
    print(f"bench: pipeline ({p.weights}, {p.strategy}) val_acc={acc} wall={seconds:.1f} s")
    return {"wall_s": seconds, "val_acc": acc, "history": result["history"]}


def summary(runs):
    """A classic loop's repeats: wall-time spread, the first repeat's curve (training is deterministic)."""
    h = runs[0]["history"]
    return {"wall_s": spread([r["wall_s"] for r in runs]), "history": h,
            "train_only_s": spread([sum(e["train_s"] for e in r["history"]) for r in runs]),
            "epoch_train_s": spread([e["train_s"] for r in runs for e in r["history"]]),
            "best_val_acc": max(e["val_acc"] for e in h), "final_val_acc": h[-1]["val_acc"],
            "time_to_target_s": next((e["wall_s"] for e in h if e["val_acc"] >= TARGET), None),
            "epochs": len(h), "train_images": runs[0]["train_images"]}


def compare(manifest, work, p, epochs, repeats=1):
    """Part 1: pipeline vs classic, alternating, `repeats` pairs."""
    pipe, cls = [], []
    for r in range(repeats):
        pipe.append(pipeline(manifest, Path(work) / f"pipeline{r}", p))
        cls.append(classic(manifest, p.backbone, p.weights, epochs, p.batch_size, p.seed))
    c = summary(cls)
    acc = spread([r["val_acc"] for r in pipe], 4)
    return {"checkpoint": str(Path(work) / "pipeline0" / "model.pt"), "target": TARGET,
            "recipe": {"pipeline": dataclasses.asdict(p), "classic": {**CLASSIC, "epochs": epochs,
                                                                      "batch_size": p.batch_size}},
            "pipeline": {"wall_s": spread([r["wall_s"] for r in pipe]), "val_acc": acc, "history": pipe[0]["history"]},
            "classic": c, "ratio_wall": pairwise([r["wall_s"] for r in cls], [r["wall_s"] for r in pipe]),
            "acc_diff_final": round(acc["median"] - c["final_val_acc"], 4),
            "acc_diff_best": round(acc["median"] - c["best_val_acc"], 4)}


def scratch(manifest, work, p, part1, repeats=1):
    """Part 2: the pipeline recipe with `weights: none` (finetune, same total epochs) and the classic loop from
    scratch at the same epochs, against part 1's transfer run."""
    epochs = p.ft_epochs + (p.strategy != "finetune")     # the linear probe's pass over train counts as one
    sp = dataclasses.replace(p, weights="none", strategy="finetune", ft_epochs=epochs)
    pipe, cls = [], []
    for r in range(repeats):
        pipe.append(pipeline(manifest, Path(work) / f"scratch{r}", sp))
        cls.append(classic(manifest, p.backbone, "none", epochs, p.batch_size, p.seed))
    c = summary(cls)
    acc = spread([r["val_acc"] for r in pipe], 4)
    transfer = part1["pipeline"]
    return {"epochs": epochs, "recipe": dataclasses.asdict(sp),
            "scratch": {"wall_s": spread([r["wall_s"] for r in pipe]), "val_acc": acc, "history": pipe[0]["history"]},
            "classic_scratch": c, "transfer": {"wall_s": transfer["wall_s"], "val_acc": transfer["val_acc"]},
            "acc_diff": round(transfer["val_acc"]["median"] - acc["median"], 4),
            "acc_diff_classic": round(transfer["val_acc"]["median"] - c["final_val_acc"], 4),
            "ratio_wall": round(spread([r["wall_s"] for r in pipe])["median"] / transfer["wall_s"]["median"], 3)}
