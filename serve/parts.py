"""Batch prediction's results (serve/batch.py) as Parquet parts under a folder: predictions/part-NNNNN.parquet
and errors/part-NNNNN.parquet, each written atomically, so that a run killed at any point leaves only whole parts;
read back to resume (the paths already scored, by the same model only) and to write predict_folder's CSV."""
import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.config import UserError, atomic_write

PREDICTIONS, ERRORS = "predictions", "errors"
SCHEMA = pa.schema([("path", pa.string()), ("top1", pa.string()), ("probability", pa.float64()),
                    ("top_k_classes", pa.list_(pa.string())), ("top_k_probabilities", pa.list_(pa.float64())),
                    ("abstained", pa.bool_()), ("reason", pa.string()), ("kind", pa.string()), ("error", pa.string())])
COLUMNS = {PREDICTIONS: ["path", "top1", "probability", "top_k_classes", "top_k_probabilities", "abstained",
                         "reason"],
           ERRORS: ["path", "kind", "error"]}


def part_files(folder, names=tuple(COLUMNS)):
    """The part files of the tables `names` under `folder`, in order."""
    return sorted(p for name in names for p in (Path(folder) / name).glob("part-*.parquet"))


def finished(folder, sha):
    """The paths the parts under `folder` already account for; UserError if another model wrote them."""
    done = set()
    for part in part_files(folder):
        t = pq.read_table(part, columns=["path", "model_sha256"])
        others = set(t["model_sha256"].to_pylist()) - {sha}
        if others:
            raise UserError(f"{folder} holds results of the model with SHA-256 {others.pop()}, not {sha}: "
                            "write to another output, or remove it to start over")
        done.update(t["path"].to_pylist())
    return done


def write_part(folder, table, sha, index):
    """One batch of results as part `index` of the predictions and the errors tables, each file atomically."""
    failed = pc.not_equal(table["kind"], "")
    for name, rows in ((PREDICTIONS, table.filter(pc.invert(failed))), (ERRORS, table.filter(failed))):
        if rows.num_rows:
            rows = rows.select(COLUMNS[name]).append_column("model_sha256", pa.array([sha] * rows.num_rows))
            atomic_write(Path(folder) / name / f"part-{index:05d}.parquet", lambda tmp: pq.write_table(rows, tmp))


def read_tables(folder):
    """(predictions, errors) as pyarrow tables from the parts under `folder`."""
    def read(name):
        parts = part_files(folder, [name])
        schema = pa.schema([SCHEMA.field(c) for c in COLUMNS[name]] + [("model_sha256", pa.string())])
        return pa.concat_tables([pq.read_table(f) for f in parts]) if parts else schema.empty_table()
    return read(PREDICTIONS), read(ERRORS)


def write_csv(folder, out):
    """predict_folder's CSV (one row per file, sorted by path) from the parts."""
    preds, errors = read_tables(folder)
    rows = [{"path": r["path"], "top1": r["top1"], "probability": f"{r['probability']:.6f}",
             "top_k": json.dumps([{"class": c, "probability": q}
                                  for c, q in zip(r["top_k_classes"], r["top_k_probabilities"])]),
             "abstained": r["abstained"], "reason": r["reason"] or "", "error": "", "model_sha256": r["model_sha256"]}
            for r in preds.to_pylist()]
    rows += [{"path": r["path"], "top1": "", "probability": "", "top_k": "", "abstained": "", "reason": "",
              "error": r["error"], "model_sha256": r["model_sha256"]} for r in errors.to_pylist()]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, ["path", "top1", "probability", "top_k", "abstained", "reason", "error",
                                   "model_sha256"])
            w.writeheader()
            w.writerows(sorted(rows, key=lambda r: r["path"]))

    atomic_write(out, write)
