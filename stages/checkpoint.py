"""The one checkpoint format: what train writes, prune extends with its channel widths, and every stage loads.

A checkpoint is a dict of plain tensors, strings and numbers (`torch.load(weights_only=True)` reads it):
`model` (state dict), `backbone`, `classes`, `dropout`, `preprocessing` (presets.Preprocessing as JSON),
`params`, `selection`, the optional `baseline` probe, `pruning` ({"widths", "params"}) after prune, and
`built_on`, the CPU of the machine that wrote it (float results differ in the last bits between instruction
sets: TRAPS.md). Same inputs on one machine give the same bytes (`save_checkpoint`).
"""
import dataclasses

import torch
from torch import nn

from stages import backbones, presets
from stages.config import atomic_write
from stages.machine import cpu

# The integer attributes that size a layer: what a pruned network's modules need set before its tensors load.
WIDTHS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features")


def saved_params(ckpt, cls):
    """A checkpoint's `params` as the dataclass `cls` (train's Params), the keys this version does not know left
    out."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in ckpt["params"].items() if k in known})


def save_checkpoint(path, ckpt):
    """torch.save, atomically, to an open file: saved by name, the zip's inner folder is named after the
    temporary file, and equal tensors would give different bytes on every run."""
    ckpt = {**ckpt, "built_on": cpu()}

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
    atomic_write(path, write)


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(ckpt):
    """(model in eval mode, class names, Preprocessing) from train's checkpoint or prune's: a path, or the
    dict `load_checkpoint` read (a stage that needs the rest of it reads the file once)."""
    ckpt = ckpt if isinstance(ckpt, dict) else load_checkpoint(ckpt)
    model, _ = backbones.create(ckpt["backbone"], "none", len(ckpt["classes"]), ckpt["dropout"])
    if "pruning" in ckpt:
        rebuild(model, ckpt["model"], ckpt["pruning"]["widths"])
    else:
        model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt["classes"], presets.Preprocessing.from_json(ckpt["preprocessing"])


def widths(model):
    """{module name: {width attribute: value}} for every module that has one."""
    return {n: {a: getattr(m, a) for a in WIDTHS if isinstance(getattr(m, a, None), int)}
            for n, m in model.named_modules() if any(isinstance(getattr(m, a, None), int) for a in WIDTHS)}


def rebuild(model, state, shapes):
    """Shrink an unpruned `model` to the widths `shapes` and the tensors of `state`, then load `state`."""
    for name, m in model.named_modules():
        for a, v in shapes.get(name, {}).items():
            setattr(m, a, v)
        for kind in ("_parameters", "_buffers"):
            for key, t in getattr(m, kind).items():
                saved = state.get(f"{name}.{key}" if name else key)
                if t is not None and saved is not None and saved.shape != t.shape:
                    new = torch.empty_like(saved)
                    getattr(m, kind)[key] = nn.Parameter(new, t.requires_grad) if kind == "_parameters" else new
    model.load_state_dict(state)
    return model
