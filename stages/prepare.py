"""prepare: scan an image folder, clean it by explicit rules, split deterministically, write a manifest.

The source is an ImageFolder (`<class>/<image>`) or one with its own split folders
(`<split>/<class>/<image>`: train, val or valid or validation, test), which are kept; a missing train or val
is carved from the other by a seeded stratified split. A `test` split is kept apart and read by no stage.
A `holdout` slice carved from `train` only is what training selects on: `val` stays untouched.
Every file gets a row: set-aside files keep theirs, with the rule and the reason. Nothing in the source
is changed. Kept images are also written as small RGB copies that training decodes instead.
Files are inspected on `prepare.workers` processes (or a Ray cluster) and, with a cache folder, only files not
seen before are decoded (stages/inspection.py); the manifest is the same either way.
"""
import dataclasses
import random
from collections import Counter
from pathlib import Path

from stages import duplicates, inspection
from stages.config import UserError, atomic_dir, cli, load_section, parser
from stages.groups import find_groups, judge_groups
from stages.manifest import write_manifest
from stages.inspection import inspect, safe_name  # noqa: F401  (public: tests and tools call prepare.inspect)

SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
LAYOUTS = ("accepted layouts: <class>/<image>, or <split>/<class>/<image> with splits train, val "
           "(or valid, validation) and test")
MAX_PAIRS = 500                 # set-aside pairs drawn side by side into pairs/ (each ~10-20 KB)
MAX_SIMILAR = 50                # "similar, not confirmed" pairs listed and drawn, closest first
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
    workers: int = 1                # processes (or Ray tasks) inspecting files; 0: every core; 1: this process

    def __post_init__(self):
        if self.workers < 0:
            raise UserError(f"prepare.workers: {self.workers} is not 0 (every core), 1 (serial) or more")
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


def run(source, out_dir, p, cache=None):
    """Scan, clean and split `source`; write manifest.csv, report.md, images/ and pairs/ into `out_dir`.
    `cache`: a folder remembering each file's inspection between runs (re-runs decode only what changed)."""
    out_dir = Path(out_dir)
    note = layout_note(layout(source), p)
    files = scan(source)
    rows = []
    with atomic_dir(out_dir) as tmp:
        rows, similar, n_similar = _prepare(files, tmp, out_dir, p, cache)
        (tmp / "report.md").write_text(report(rows, source, similar, n_similar, note), encoding="utf-8")
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)                  # a DVC output even when nothing is in it
        inspection.forget_others(cache, {r["key"] for r in rows})    # bounded: only what this run saw
    return rows


def _prepare(files, tmp, out_dir, p, cache=None):
    """The rows of every file, decided and split, with cached copies and pair pictures written under `tmp`."""
    (tmp / "images").mkdir()
    rows = []
    checked = inspection.check_all([f for f, _, _ in files], p, tmp / "images", cache, p.workers)
    for (_, label, split), row in zip(files, checked, strict=True):
        name = f"{row['sha256'][:24]}.jpg"
        row.update(label=label, split=split, status="ok", picture=row["sha256"],
                   cached=(out_dir / "images" / name).as_posix() if row.pop("copy") else "")
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


def main():
    ap = parser(__doc__, "--out")
    ap.add_argument("--cache", help="folder of per-file results kept between runs (dvc.yaml: persist: true)")
    args = ap.parse_args()
    p = load_section(Params, "prepare")
    rows = run(p.source, args.out, p, args.cache and Path(args.cache))
    counts = Counter(r["split"] if r["status"] == "ok" else "set aside" for r in rows)
    print("prepare: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
          + f"; report: {Path(args.out) / 'report.md'}")
    for r in rows:
        if r["status"] == "dropped":
            print(f"  set aside {r['path']}: {r['rule']}: {r['reason']}")


if __name__ == "__main__":
    cli(main)
