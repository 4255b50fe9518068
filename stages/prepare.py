"""prepare: scan an image folder, check every file decodes, split deterministically, write a manifest.

The source is an ImageFolder (`<class>/<image>`) or one with its own split folders
(`train/<class>/<image>`, `val/<class>/<image>`), which are kept. A seeded stratified split otherwise.
A `holdout` slice carved from `train` only is what training selects its model on: `val` stays untouched.
"""
import argparse
import csv
import dataclasses
import hashlib
import io
import random
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from stages.config import UserError, atomic_write, cli, load_section

FIELDS = ["path", "label", "split", "width", "height", "bytes", "sha256", "status", "reason"]
SPLIT_DIRS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class Params:
    source: str
    seed: int = 0
    val_fraction: float = 0.3       # used only when the source has no train/ and val/ folders
    holdout_fraction: float = 0.2   # of train, per class, for model selection


def scan(source):
    """(path, label, split or None) for every file under `source`, in a stable order."""
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"source folder '{source}' does not exist (params.yaml: prepare.source)")
    if all((source / s).is_dir() for s in SPLIT_DIRS):
        roots = [(source / s, s) for s in SPLIT_DIRS]
    else:
        roots = [(source, None)]
    files, classes = [], None
    for root, split in roots:
        dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not dirs:
            raise UserError(f"'{root}' has no class folders: expected {root}/<class>/<image>")
        names = [d.name for d in dirs]
        if classes is not None and names != classes:
            raise UserError(f"class folders differ between splits: {classes} vs {names} in '{root}'")
        classes = names
        for d in dirs:
            found = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise UserError(f"class folder '{d}' is empty: add images or remove the folder")
            files += [(p, d.name, split) for p in found]
    return files


def inspect(path):
    """A manifest row for one file: decoded in full, so truncated files fail here, not in training."""
    data = path.read_bytes()
    row = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "width": 0, "height": 0,
           "status": "ok", "reason": ""}
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            row["width"], row["height"] = im.size
    except Exception as e:
        row["status"], row["reason"] = "dropped", f"does not decode: {type(e).__name__}"
    return row


def assign_splits(rows, seed, val_fraction, holdout_fraction):
    """Seeded, stratified: rows without a split get train/val; a slice of each class's train is holdout."""
    rng = random.Random(seed)
    for label in sorted({r["label"] for r in rows}):
        mine = [r for r in rows if r["label"] == label and r["status"] == "ok"]
        unsplit = [r for r in mine if not r["split"]]
        rng.shuffle(unsplit)
        n_val = round(len(unsplit) * val_fraction)
        for i, r in enumerate(unsplit):
            r["split"] = "val" if i < n_val else "train"
        train = [r for r in mine if r["split"] == "train"]
        rng.shuffle(train)
        for r in train[:max(1, round(len(train) * holdout_fraction)) if len(train) > 1 else 0]:
            r["split"] = "holdout"
    for r in rows:
        r["split"] = r["split"] or "none"
    return rows


def run(source, out_dir, p):
    """Scan, check and split `source`; write `out_dir/manifest.csv`. Returns the rows."""
    rows = []
    for path, label, split in tqdm(scan(source), desc="prepare: checking images", unit="img"):
        rows.append({"path": path.as_posix(), "label": label, "split": split, **inspect(path)})
    assign_splits(rows, p.seed, p.val_fraction, p.holdout_fraction)
    for split in ("train", "val"):
        for label in sorted({r["label"] for r in rows}):
            if not any(r["split"] == split and r["label"] == label and r["status"] == "ok" for r in rows):
                raise UserError(f"class '{label}' has no usable image in split '{split}'")

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            w.writeheader()
            w.writerows({k: r[k] for k in FIELDS} for r in rows)

    atomic_write(Path(out_dir) / "manifest.csv", write)
    return rows


def read_manifest(path, splits=None):
    """Usable rows of a manifest, optionally only those in `splits`, and the sorted class names."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = sorted({r["label"] for r in rows})
    rows = [r for r in rows if r["status"] == "ok" and (splits is None or r["split"] in splits)]
    return rows, classes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    p = load_section(Params, "prepare")
    rows = run(p.source, args.out, p)
    counts = {}
    for r in rows:
        key = r["split"] if r["status"] == "ok" else "dropped"
        counts[key] = counts.get(key, 0) + 1
    print("prepare: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    cli(main)
