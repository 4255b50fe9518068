"""prepare: scan an image folder, clean it by explicit rules, split deterministically, write a manifest.

The source is an ImageFolder (`<class>/<image>`) or one with its own split folders
(`<split>/<class>/<image>`: train, val or valid or validation, test), which are kept; a missing train or val
is carved from the other by a seeded stratified split. A `test` split is kept apart and read by no stage.
A `holdout` slice carved from `train` only is what training selects on: `val` stays untouched.
Every file gets a row: set-aside files keep theirs, with the rule and the reason. Nothing in the source
is changed. Kept images are also written as small RGB copies that training decodes instead.
"""
import argparse
import csv
import dataclasses
import hashlib
import os
import random
import warnings
from collections import Counter
from pathlib import Path

import imagehash
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from stages import duplicates, presets
from stages.config import UserError, atomic_dir, cli, load_section

FIELDS = ["path", "label", "split", "width", "height", "mode", "format", "bytes", "sha256", "phash",
          "status", "rule", "reason", "cached", "picture"]
SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
LAYOUTS = ("accepted layouts: <class>/<image>, or <split>/<class>/<image> with splits train, val "
           "(or valid, validation) and test")
MAX_PAIRS = 500                 # set-aside pairs drawn side by side into pairs/ (each ~10-20 KB)
MAX_SIMILAR = 50                # "similar, not confirmed" pairs listed and drawn, closest first
EXT_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP",
               ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
# rule -> default action; unreadable files and bombs cannot be kept
RULES = {"unreadable": "drop", "bad_name": "drop", "bomb": "drop", "format_mismatch": "keep",
         "too_small": "drop", "placeholder": "drop", "duplicate": "drop", "near_duplicate": "drop",
         "leakage": "drop", "conflict": "drop"}
UNKEEPABLE = ("unreadable", "bad_name", "bomb")


@dataclasses.dataclass(frozen=True)
class Params:
    source: str
    seed: int = 0
    val_fraction: float = 0.3       # used only when the source lacks a train or a val folder
    holdout_fraction: float = 0.2   # of train, per class, for model selection
    min_side: int = 32              # px, after EXIF rotation
    max_pixels: int = 40_000_000    # larger images are refused from their header, before decoding
    min_entropy: float = 2.0        # bits of luminance; the shipped "image not found" GIF has 0.56
    near_distance: int = 14         # pHash Hamming distance (of 64 bits) for near-duplicate *candidates*
    near_max_difference: float = 16.0   # levels (0-255): a candidate is confirmed at or under it (duplicates.py)
    cache_side: int = 320           # shorter side of the RGB copies training reads (never upscaled)
    rules: dict = dataclasses.field(default_factory=dict)   # rule -> drop | keep | fail

    def __post_init__(self):
        for rule, action in self.rules.items():
            if rule not in RULES:
                raise UserError(f"prepare.rules: unknown rule '{rule}'; rules: {', '.join(RULES)}")
            allowed = ("drop", "fail") if rule in UNKEEPABLE else ("drop", "keep", "fail")
            if action not in allowed:
                raise UserError(f"prepare.rules.{rule}: '{action}' is not one of {', '.join(allowed)}")

    def action(self, rule):
        return self.rules.get(rule, RULES[rule])


def _folders(folder):
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def layout(source):
    """{folder: split}: the source's split folders (None where prepare carves the split), or {source: None}."""
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"source folder '{source}' does not exist (params.yaml: prepare.source)")
    dirs = _folders(source)
    named = [d for d in dirs if d.name.lower() in SPLIT_DIRS]
    if not named:
        return {source: None}
    others = [d.name for d in dirs if d not in named]
    if others:
        raise UserError(f"'{source}' mixes split folders ({', '.join(d.name for d in named)}) with other folders "
                        f"({', '.join(others[:5])}); {LAYOUTS}")
    splits = {}
    for d in named:
        split = SPLIT_DIRS[d.name.lower()]
        if split in splits.values():
            twice = [k.name for k, v in splits.items() if v == split] + [d.name]
            raise UserError(f"'{source}' has two folders for split {split} ({' and '.join(twice)}): keep one")
        splits[d] = split
    have = set(splits.values())
    if have == {"test"}:
        raise UserError(f"'{source}' has only a test folder: add train/ (or val/) to learn from; {LAYOUTS}")
    if not {"train", "val"} <= have:          # the one there is split by prepare.val_fraction; test stays apart
        splits = {d: (s if s == "test" else None) for d, s in splits.items()}
    return splits


def scan(source):
    """(path, label, split or None) for every file under `source`, in a stable order."""
    files, classes = [], None
    for root, split in layout(source).items():
        dirs = _folders(root)
        if not dirs:
            raise UserError(f"'{root}' has no class folders: expected {root}/<class>/<image>")
        names = [d.name for d in dirs]
        if classes is not None and names != classes:
            raise UserError(f"class folders differ between splits: {classes} vs {names} in '{root}'")
        classes = names
        for d in dirs:
            if not safe_name(d)[1]:
                raise UserError(f"class folder '{safe_name(d)[0]}' is not valid UTF-8: rename it")
            nested = _folders(d)
            if nested:
                raise UserError(f"class folder '{d}' holds folders ({', '.join(n.name for n in nested[:3])}"
                                f"{', ...' if len(nested) > 3 else ''}), not images; {LAYOUTS}")
            # A dangling link is listed too: it gets its row, as unreadable.
            found = sorted(f for f in d.iterdir() if (f.is_file() or f.is_symlink() and not f.exists())
                           and not f.name.startswith("."))
            if not found:
                raise UserError(f"class folder '{d}' is empty: add images or remove the folder")
            files += [(f, d.name, split) for f in found]
    return files


def safe_name(path):
    """(the path as text the manifest can hold, whether its name was valid UTF-8): bad bytes shown as \\xNN."""
    text = path.as_posix()
    try:
        text.encode("utf-8")
        return text, True
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace"), False


def inspect(path, p):
    """A manifest row for one file and its RGB image (None when set aside); memory bounded by max_pixels."""
    row = {"bytes": 0, "sha256": "", "width": 0, "height": 0, "mode": "", "format": "", "phash": "",
           "rule": "", "reason": ""}
    try:
        with open(path, "rb") as f:
            row.update(bytes=os.fstat(f.fileno()).st_size, sha256=hashlib.file_digest(f, "sha256").hexdigest())
    except OSError as e:                         # no permission, a dangling link, an I/O error
        return {**row, "rule": "unreadable", "reason": f"cannot be read: {e.strerror or e}"}, None
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


def find_groups(rows, p, thumbnail):
    """Groups (lists of row indices) of the same picture: equal content hash, or a pHash candidate that its
    pixels confirm (`thumbnail(i)`, duplicates.difference); and the candidates not confirmed, as
    (i, j, pHash distance, difference)."""
    ids = [i for i, r in enumerate(rows) if r["phash"]]
    parent = {i: i for i in ids}

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_sha = {}
    for i in ids:
        by_sha.setdefault(rows[i]["sha256"], []).append(i)
    for same in by_sha.values():
        for i in same[1:]:
            parent[root(i)] = root(same[0])
    thumbs, unconfirmed = {}, []
    for a, b, dist in duplicates.candidates([int(rows[i]["phash"], 16) for i in ids], p.near_distance):
        a, b = ids[a], ids[b]
        if root(a) == root(b):
            continue                            # exact copies, or joined already through another pair
        for i in (a, b):
            if i not in thumbs:
                thumbs[i] = thumbnail(i)
        diff = duplicates.difference(thumbs[a], thumbs[b])
        if diff <= p.near_max_difference:
            parent[root(a)] = root(b)
        else:
            unconfirmed.append((a, b, dist, diff))
    groups = {}
    for i in ids:
        groups.setdefault(root(i), []).append(i)
    return ([sorted(g) for g in groups.values() if len(g) > 1],
            [u for u in unconfirmed if root(u[0]) != root(u[1])])   # not joined through other pairs either


def judge_groups(rows, groups):
    """Conflict (two labels), leakage (into test or val) or duplicate: the rule for each extra copy, the copy
    it is shown beside (`pair`), and one `picture` id per group."""
    for g in groups:
        labels = sorted({rows[i]["label"] for i in g})
        names = ", ".join(rows[i]["path"] for i in g)
        if len(labels) > 1:
            for i in g:
                other = next(j for j in g if rows[j]["label"] != rows[i]["label"])
                rows[i].update(rule="conflict", pair=other, picture=rows[g[0]]["sha256"],
                               reason=f"same picture under labels {' and '.join(labels)}: {names}")
            continue
        # The copy in the split furthest from training stays: test, then val.
        held = [i for i in g if rows[i]["split"] == "test"] or [i for i in g if rows[i]["split"] == "val"]
        first = held[0] if held else g[0]
        for i in g:
            rows[i]["picture"] = rows[first]["sha256"]
            if i == first:
                continue
            same = rows[i]["sha256"] == rows[first]["sha256"]
            if held and rows[i]["split"] != rows[first]["split"]:
                rule = "leakage"
                what = f"same picture as {rows[first]['split']} file {rows[first]['path']}"
            else:
                rule = "duplicate" if same else "near_duplicate"
                what = f"{'exact' if same else 'near'} duplicate of {rows[first]['path']}"
            rows[i].update(rule=rule, pair=first, reason="; ".join(filter(None, [what, rows[i]["reason"]])))


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


def layout_note(splits, p):
    """One line for the report: which folders gave which split, and what prepare carved."""
    if list(splits.values()) == [None]:
        return f"No split folders: val is carved from all images (prepare.val_fraction {p.val_fraction})."
    named = [f"{d.name}/" + (f" (as {s})" if s and s != d.name else "") for d, s in splits.items()]
    carved = [d.name for d, s in splits.items() if s is None]
    note = f"Split folders: {', '.join(named)}."
    if carved:
        note += f" Train and val are carved from {carved[0]}/ (prepare.val_fraction {p.val_fraction})."
    if "test" in splits.values():
        note += " The test split is kept apart: no stage trains, selects or evaluates on it."
    return note


def run(source, out_dir, p):
    """Scan, clean and split `source`; write manifest.csv, report.md, images/ and pairs/ into `out_dir`."""
    out_dir = Path(out_dir)
    note = layout_note(layout(source), p)
    files = scan(source)
    rows = []
    with atomic_dir(out_dir) as tmp:
        rows, similar, n_similar = _prepare(files, tmp, out_dir, p)
        (tmp / "report.md").write_text(report(rows, source, similar, n_similar, note), encoding="utf-8")
    return rows


def _prepare(files, tmp, out_dir, p):
    """The rows of every file, decided and split, with cached copies and pair pictures written under `tmp`."""
    (tmp / "images").mkdir()
    rows = []
    for path, label, split in tqdm(files, desc="prepare: checking images", unit="img"):
        row, rgb = inspect(path, p)
        text, valid = safe_name(path)
        if not valid:
            row.update(rule="bad_name", reason="file name is not valid UTF-8 (shown with \\x escapes): rename it")
            rgb = None
        row.update(path=text, label=label, split=split, status="ok", cached="", picture=row["sha256"])
        if rgb is not None:
            cached = save_copy(rgb, tmp / "images", row["sha256"], p.cache_side)
            row["cached"] = (out_dir / "images" / cached.name).as_posix()
        rows.append(row)

    def local(row):                                         # a cached copy, while it is still in `tmp`
        return tmp / "images" / Path(row["cached"]).name

    failures = apply_rules(rows, p)                       # per-file rules first...
    groups, similar = find_groups([r if r["status"] == "ok" else {**r, "phash": ""} for r in rows], p,
                                  lambda i: duplicates.thumbnail(local(rows[i])))
    judge_groups(rows, groups)
    failures += apply_rules(rows, p)                      # ...then duplicates among the survivors
    if failures:
        raise UserError(f"{len(failures)} file(s) break a rule set to 'fail' in prepare.rules: "
                        + "; ".join(failures[:5]) + (" ..." if len(failures) > 5 else ""))
    assign_splits(rows, p.seed, p.val_fraction, p.holdout_fraction)
    for split in ("train", "val"):
        for label in sorted({r["label"] for r in rows}):
            if not any(r["split"] == split and r["label"] == label for r in rows):
                raise UserError(f"class '{label}' has no usable image in split '{split}'")
    # Pictures for a person to check: each set-aside copy beside the one it matched, then the closest
    # candidates that were not confirmed.
    drawn = [r for r in rows if r["status"] == "dropped" and "pair" in r][:MAX_PAIRS]
    for n, r in enumerate(drawn):
        r["shown"] = f"pairs/{n + 1:04d}.png"
    n_similar = len(similar)
    similar = [(rows[a], rows[b], dist, d, f"pairs/similar-{n + 1:03d}.png")
               for n, (d, dist, a, b) in enumerate(sorted((d, dist, a, b) for a, b, dist, d in similar)[:MAX_SIMILAR])]
    jobs = [(r, rows[r["pair"]], r["shown"]) for r in drawn] + [(a, b, name) for a, b, _, _, name in similar]
    if jobs:
        (tmp / "pairs").mkdir()
    for a, b, name in jobs:
        duplicates.side_by_side([local(a), local(b)], tmp / name)
    used = {r["cached"] for r in rows if r["status"] == "ok"}   # exact copies share one cached file
    for r in rows:
        if r["status"] == "dropped" and r["cached"]:
            if r["cached"] not in used:
                local(r).unlink(missing_ok=True)
            r["cached"] = ""
    write_manifest(tmp / "manifest.csv", rows)
    return rows, similar, n_similar


def write_manifest(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows({k: r[k] for k in FIELDS} for r in rows)


def report(rows, source, similar=(), n_similar=0, note=""):
    """The cleaning report a person reads: counts, every set-aside file with its reason and the picture it
    matched, the similar pairs that were kept, every note."""
    kept = [r for r in rows if r["status"] == "ok"]
    labels = sorted({r["label"] for r in rows})
    counts = Counter((r["split"], r["label"]) for r in kept)
    splits = ["train", "holdout", "val"] + (["test"] if any(r["split"] == "test" for r in kept) else [])
    lines = [f"# Data report for `{source}`", "", note, "",
             f"{len(rows)} files: {len(kept)} kept, {len(rows) - len(kept)} set aside.", "",
             "| split | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for split in splits:
        lines.append(f"| {split} | " + " | ".join(str(counts[(split, c)]) for c in labels) + " |")
    aside = [r for r in rows if r["status"] == "dropped"]
    lines += ["", f"## Set aside ({len(aside)})", ""] + (["| file | rule | reason | beside what it matched |",
                                                          "|---|---|---|---|"] if aside else ["None."])
    lines += [f"| `{r['path']}` | {r['rule']} | {r['reason']} | {_picture(r.get('shown'))} |" for r in aside]
    lines += ["", f"## Similar, not confirmed ({n_similar})", "",
              f"pHash candidates whose pixels differ, so both are kept; the {len(similar)} closest, with the "
              "pixel difference (0-255; confirmed at or under prepare.near_max_difference).", ""]
    lines += ["| file | file | pHash distance | difference | pair |", "|---|---|---|---|---|"] if similar else ["None."]
    lines += [f"| `{a['path']}` | `{b['path']}` | {dist} | {d:.1f} | {_picture(name)} |"
              for a, b, dist, d, name in similar]
    noted = [r for r in kept if r["reason"]]
    lines += ["", f"## Kept with a note ({len(noted)})", ""] + (["| file | rule | note |", "|---|---|---|"]
                                                                if noted else ["None."])
    lines += [f"| `{r['path']}` | {r['rule'] or '-'} | {r['reason']} |" for r in noted]
    return "\n".join(lines) + "\n"


def _picture(name):
    return f"![pair]({name})" if name else ""


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
