"""prepare: scan an image folder, clean it by explicit rules, split deterministically, write a manifest.

The source is an ImageFolder (`<class>/<image>`) or one with its own split folders
(`train/<class>/<image>`, `val/<class>/<image>`), which are kept; a seeded stratified split otherwise.
A `holdout` slice carved from `train` only is what training selects on: `val` stays untouched.
Every file gets a row: set-aside files keep theirs, with the rule and the reason. Nothing in the source
is changed. Kept images are also written as small RGB copies that training decodes instead.
"""
import argparse
import csv
import dataclasses
import hashlib
import random
import warnings
from collections import Counter
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from stages import presets
from stages.config import UserError, atomic_dir, cli, load_section

FIELDS = ["path", "label", "split", "width", "height", "mode", "format", "bytes", "sha256", "phash",
          "status", "rule", "reason", "cached"]
SPLIT_DIRS = ("train", "val")
EXT_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP",
               ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
# rule -> default action; unreadable files and bombs cannot be kept
RULES = {"unreadable": "drop", "bomb": "drop", "format_mismatch": "keep", "too_small": "drop",
         "placeholder": "drop", "duplicate": "drop", "near_duplicate": "drop", "leakage": "drop",
         "conflict": "drop"}


@dataclasses.dataclass(frozen=True)
class Params:
    source: str
    seed: int = 0
    val_fraction: float = 0.3       # used only when the source has no train/ and val/ folders
    holdout_fraction: float = 0.2   # of train, per class, for model selection
    min_side: int = 32              # px, after EXIF rotation
    max_pixels: int = 40_000_000    # larger images are refused from their header, before decoding
    min_entropy: float = 2.0        # bits of luminance; the shipped "image not found" GIF has 0.56
    near_distance: int = 4          # pHash Hamming distance (of 64 bits) for near duplicates
    cache_side: int = 320           # shorter side of the RGB copies training reads (never upscaled)
    rules: dict = dataclasses.field(default_factory=dict)   # rule -> drop | keep | fail

    def __post_init__(self):
        for rule, action in self.rules.items():
            if rule not in RULES:
                raise UserError(f"prepare.rules: unknown rule '{rule}'; rules: {', '.join(RULES)}")
            allowed = ("drop", "fail") if rule in ("unreadable", "bomb") else ("drop", "keep", "fail")
            if action not in allowed:
                raise UserError(f"prepare.rules.{rule}: '{action}' is not one of {', '.join(allowed)}")

    def action(self, rule):
        return self.rules.get(rule, RULES[rule])


def scan(source):
    """(path, label, split or None) for every file under `source`, in a stable order."""
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"source folder '{source}' does not exist (params.yaml: prepare.source)")
    roots = [(source / s, s) for s in SPLIT_DIRS] if all((source / s).is_dir() for s in SPLIT_DIRS) \
        else [(source, None)]
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


def inspect(path, p):
    """A manifest row for one file and its RGB image (None when set aside); memory bounded by max_pixels."""
    with open(path, "rb") as f:
        row = {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest(),
               "width": 0, "height": 0, "mode": "", "format": "", "phash": "", "rule": "", "reason": ""}
    if row["bytes"] == 0:
        return {**row, "rule": "unreadable", "reason": "zero-byte file"}, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)               # reads the header only
    except UnidentifiedImageError:
        return {**row, "rule": "unreadable", "reason": "not an image"}, None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return {**row, "rule": "bomb", "reason": f"decompression bomb, refused from its header: {e}"}, None
    except Exception as e:                       # a header cut short
        return {**row, "rule": "unreadable", "reason": f"truncated or damaged: {e}"}, None
    with im:
        row.update(mode=im.mode, format=im.format or "", width=im.width, height=im.height)
        if im.width * im.height > p.max_pixels:
            return {**row, "rule": "bomb", "reason": f"decompression bomb, refused from its header: {im.width}x"
                                                      f"{im.height} px is over prepare.max_pixels ({p.max_pixels})"}, None
        try:
            rgb = presets.to_rgb(im)             # full decode: truncated files fail here
        except Exception as e:
            return {**row, "rule": "unreadable", "reason": f"truncated or damaged: {e}"}, None
    notes = []
    expected = EXT_FORMATS.get(path.suffix.lower())
    if expected != row["format"]:
        notes.append(("format_mismatch", f"extension {path.suffix or '(none)'} but {row['format']} data"))
    if row["mode"] != "RGB":
        notes.append(("", f"converted from {row['mode']} to RGB"))
    if rgb.size != (row["width"], row["height"]):
        notes.append(("", "EXIF orientation applied"))
    row["width"], row["height"] = rgb.size
    if min(rgb.size) < p.min_side:
        notes.append(("too_small", f"{rgb.width}x{rgb.height} px, under prepare.min_side {p.min_side}"))
    entropy = rgb.convert("L").entropy()
    if entropy < p.min_entropy:
        notes.append(("placeholder", f"near-uniform image: luminance entropy {entropy:.2f} bits "
                                     f"< prepare.min_entropy {p.min_entropy}"))
    row["phash"] = str(imagehash.phash(rgb))
    rules = [r for r, _ in notes if r]
    row["rule"], row["reason"] = (rules[0] if rules else ""), "; ".join(n for _, n in notes)
    return row, rgb


def find_groups(rows, near_distance):
    """Groups (lists of row indices) of the same picture: equal content hash or pHash within the distance."""
    ids = [i for i, r in enumerate(rows) if r["phash"]]
    parent = {i: i for i in ids}

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    hashes = np.array([int(rows[i]["phash"], 16) for i in ids], dtype=np.uint64)
    for start in range(0, len(ids), 512):                      # bounded memory: 512 x n at a time
        dist = np.bitwise_count(hashes[start:start + 512, None] ^ hashes[None, :])
        for a, b in zip(*np.nonzero(dist <= near_distance)):
            if start + a < b:
                parent[root(ids[start + a])] = root(ids[b])
    by_sha = {}
    for i in ids:
        by_sha.setdefault(rows[i]["sha256"], []).append(i)
    for same in by_sha.values():
        for i in same[1:]:
            parent[root(i)] = root(same[0])
    groups = {}
    for i in ids:
        groups.setdefault(root(i), []).append(i)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def judge_groups(rows, groups):
    """Conflict (two labels), leakage (train and val) or duplicate: the rule for each extra copy."""
    for g in groups:
        labels = sorted({rows[i]["label"] for i in g})
        names = ", ".join(rows[i]["path"] for i in g)
        if len(labels) > 1:
            for i in g:
                rows[i].update(rule="conflict", reason=f"same picture under labels {' and '.join(labels)}: {names}")
            continue
        vals = [i for i in g if rows[i]["split"] == "val"]
        first = vals[0] if vals else g[0]
        for i in g:
            if i == first:
                continue
            same = rows[i]["sha256"] == rows[first]["sha256"]
            if vals and rows[i]["split"] != "val":
                rule = "leakage"
                what = f"same picture as val file {rows[first]['path']}"
            else:
                rule = "duplicate" if same else "near_duplicate"
                what = f"{'exact' if same else 'near'} duplicate of {rows[first]['path']}"
            rows[i].update(rule=rule, reason="; ".join(filter(None, [what, rows[i]["reason"]])))


def apply_rules(rows, p):
    """Set each ruled row's status by its rule's action; return the rows whose rule says fail."""
    failures = []
    for r in rows:
        if r["rule"] and r["status"] == "ok" and not r.get("judged"):
            action = p.action(r["rule"])
            r["status"], r["judged"] = ("ok" if action == "keep" else "dropped"), True
            if action == "fail":
                failures.append(f"{r['path']}: {r['rule']} ({r['reason']})")
    return failures


def assign_splits(rows, seed, val_fraction, holdout_fraction):
    """Seeded, stratified: kept rows without a split get train/val; a slice of each class's train is holdout."""
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
        r["split"] = r["split"] if r["status"] == "ok" else "none"


def save_copy(rgb, cache_dir, sha, side):
    """A decoded RGB copy, shorter side at most `side`: epochs decode this, not the full-size original."""
    path = cache_dir / f"{sha[:24]}.jpg"
    if not path.exists():
        if side and min(rgb.size) > side:
            scale = side / min(rgb.size)
            rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.LANCZOS)
        rgb.save(path, "JPEG", quality=95)
    return path


def run(source, out_dir, p):
    """Scan, clean and split `source`; write manifest.csv, report.md and images/ into `out_dir`."""
    files = scan(source)
    out_dir = Path(out_dir)
    rows = []
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for path, label, split in tqdm(files, desc="prepare: checking images", unit="img"):
            row, rgb = inspect(path, p)
            row.update(path=path.as_posix(), label=label, split=split, status="ok", cached="")
            if rgb is not None:
                cached = save_copy(rgb, tmp / "images", row["sha256"], p.cache_side)
                row["cached"] = (out_dir / "images" / cached.name).as_posix()
            rows.append(row)
        failures = apply_rules(rows, p)                       # per-file rules first...
        judge_groups(rows, find_groups([r if r["status"] == "ok" else {**r, "phash": ""} for r in rows],
                                       p.near_distance))
        failures += apply_rules(rows, p)                      # ...then duplicates among the survivors
        if failures:
            raise UserError(f"{len(failures)} file(s) break a rule set to 'fail' in prepare.rules: "
                            + "; ".join(failures[:5]) + (" ..." if len(failures) > 5 else ""))
        assign_splits(rows, p.seed, p.val_fraction, p.holdout_fraction)
        for split in ("train", "val"):
            for label in sorted({r["label"] for r in rows}):
                if not any(r["split"] == split and r["label"] == label for r in rows):
                    raise UserError(f"class '{label}' has no usable image in split '{split}'")
        for r in rows:
            if r["status"] == "dropped" and r["cached"]:
                Path(tmp / "images" / Path(r["cached"]).name).unlink(missing_ok=True)
                r["cached"] = ""
        write_manifest(tmp / "manifest.csv", rows)
        (tmp / "report.md").write_text(report(rows, source))
    return rows


def write_manifest(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows({k: r[k] for k in FIELDS} for r in rows)


def report(rows, source):
    """The cleaning report a person reads: counts, every set-aside file with its reason, every note."""
    kept = [r for r in rows if r["status"] == "ok"]
    labels = sorted({r["label"] for r in rows})
    counts = Counter((r["split"], r["label"]) for r in kept)
    lines = [f"# Data report for `{source}`", "",
             f"{len(rows)} files: {len(kept)} kept, {len(rows) - len(kept)} set aside.", "",
             "| split | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for split in ("train", "holdout", "val"):
        lines.append(f"| {split} | " + " | ".join(str(counts[(split, c)]) for c in labels) + " |")
    aside = [r for r in rows if r["status"] == "dropped"]
    lines += ["", f"## Set aside ({len(aside)})", ""] + (["| file | rule | reason |", "|---|---|---|"]
                                                         if aside else ["None."])
    lines += [f"| `{r['path']}` | {r['rule']} | {r['reason']} |" for r in aside]
    noted = [r for r in kept if r["reason"]]
    lines += ["", f"## Kept with a note ({len(noted)})", ""] + (["| file | rule | note |", "|---|---|---|"]
                                                                if noted else ["None."])
    lines += [f"| `{r['path']}` | {r['rule'] or '-'} | {r['reason']} |" for r in noted]
    return "\n".join(lines) + "\n"


def read_manifest(path, splits=None):
    """Usable rows of a manifest, optionally only those in `splits`, and the sorted class names."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = sorted({r["label"] for r in rows if r["status"] == "ok"})
    rows = [r for r in rows if r["status"] == "ok" and (splits is None or r["split"] in splits)]
    return rows, classes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    p = load_section(Params, "prepare")
    rows = run(p.source, args.out, p)
    counts = Counter(r["split"] if r["status"] == "ok" else "set aside" for r in rows)
    print("prepare: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
          + f"; report: {Path(args.out) / 'report.md'}")
    for r in rows:
        if r["status"] == "dropped":
            print(f"  set aside {r['path']}: {r['rule']}: {r['reason']}")


if __name__ == "__main__":
    cli(main)
