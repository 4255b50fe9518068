"""The manifest: prepare's one CSV row per source file (its decision, split and cached copy), which every later
stage reads. Its reader and writer live here, apart from prepare's recipe, so that reading it imports nothing
of the cleaning code (and DVC does not re-run every stage when that code changes)."""
import csv

FIELDS = ["path", "label", "split", "width", "height", "mode", "format", "bytes", "sha256", "phash",
          "status", "rule", "reason", "cached", "picture"]


def write_manifest(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows({k: r[k] for k in FIELDS} for r in rows)


def read_manifest(path, splits=None, exclude=()):
    """Usable rows of a manifest, optionally only those in `splits` and not in `exclude` (paths), and the sorted
    class names (of every usable row: leaving images out never removes a class)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = sorted({r["label"] for r in rows if r["status"] == "ok"})
    exclude = set(exclude)
    rows = [r for r in rows if r["status"] == "ok" and (splits is None or r["split"] in splits)
            and r["path"] not in exclude]
    return rows, classes


def read_paths(path):
    """The `path` column of a CSV such as the labels stage's exclude.csv; () without a file."""
    if not path:
        return ()
    with open(path, newline="") as f:
        return [r["path"] for r in csv.DictReader(f)]
