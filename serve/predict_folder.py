"""predict_folder: the served model over every file in a folder, to a CSV (path, top1, probability, top_k,
abstained, reason, error).

The same card check, decoding, preprocessing, limits and answers (calibrated probabilities, abstentions) as the
server; a file that is not a usable image gets a row with its error instead of a prediction, so every file is
accounted for.

One process, no Ray, no resuming, and no command line of its own: `make predict-folder` runs serve/batch.py (Ray
Data, Parquet or this CSV, resumable). `run` stays for a quick look from Python on one machine and as
benchmarks/batch_bench.py's baseline.
"""
import concurrent.futures
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from serve.model import InputError, Model, Params, preprocess, top_k
from stages import throughput
from stages.config import UserError, atomic_write

FIELDS = ["path", "top1", "probability", "top_k", "abstained", "reason", "error"]


def predict(model, files, p, desc=None):
    """One CSV row per file, in order; images go through ONNX Runtime `p.max_batch_size` at a time."""
    rows = []

    def decode(f):
        try:
            if f.stat().st_size > p.max_body_bytes:         # the server's limit, so both refuse the same files
                raise InputError(413, "body_too_large", f"the file is over the limit of {p.max_body_bytes:,} bytes")
            return preprocess(f.read_bytes(), model.transform, p.max_pixels), None
        except InputError as e:
            return None, e.detail
        except OSError as e:                                # unreadable: a row with the reason, the run goes on
            return None, f"the file cannot be read: {e.strerror or e}"

    with concurrent.futures.ThreadPoolExecutor(p.decode_threads) as pool, \
            tqdm(total=len(files), desc=desc, unit="img", disable=desc is None) as bar:
        for start in range(0, len(files), p.max_batch_size):
            chunk = files[start:start + p.max_batch_size]
            decoded = list(pool.map(decode, chunk))
            ok = [x for x, _ in decoded if x is not None]
            probs, reasons = model.decide(model.outputs(np.stack(ok))) if ok else ([], [])   # the server's answer
            answers = iter(zip(probs, reasons))
            for f, (x, err) in zip(chunk, decoded):
                if err is not None:
                    rows.append({"path": f, "top1": "", "probability": "", "top_k": "", "abstained": "",
                                 "reason": "", "error": err})
                    continue
                prob, why = next(answers)
                best = top_k(prob, model.classes, p.top_k)
                rows.append({"path": f, "top1": best[0]["class"], "probability": f"{best[0]['probability']:.6f}",
                             "top_k": json.dumps(best), "abstained": why is not None, "reason": why or "",
                             "error": ""})
            bar.update(len(chunk))
    return rows


def run(card, images, out, p):
    """Predict every file under `images` (recursively, sorted) into the CSV `out`; returns the rows."""
    images = Path(images)
    if not images.is_dir():
        raise UserError(f"{images} is not a folder")
    files = sorted(f for f in images.rglob("*") if f.is_file())
    if not files:
        raise UserError(f"{images} holds no files")
    model = Model(card, p.threads)                  # one lane: this loop runs one batch at a time, and decodes
    p = dataclasses.replace(p, decode_threads=p.decode_threads or throughput.cores())   # between them: all cores
    rows = predict(model, files, model.resolve(p), desc="predict_folder")
    for r in rows:
        r["path"] = r["path"].relative_to(images).as_posix()

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            w.writeheader()
            w.writerows(rows)

    atomic_write(out, write)
    return rows
