"""deploy: the model to ship, chosen accuracy-aware: the fastest variant within an accuracy budget.

Variants (stages/candidates.py), all scored on the untouched val split against the PyTorch eager FP32
checkpoint: ONNX FP32 (export's file), its static INT8, the pruned checkpoint as ONNX FP32, and that one's INT8;
and for each test size in `sizes`, export's weights at that size (`onnx_fp32_<px>`, fewer pixels: faster,
perhaps less accurate) and its INT8, each file's preprocessing in its own metadata, so the server and batch
prediction follow the one shipped. An INT8 variant tries the `tries` settings in turn and keeps the first whose
holdout top-1 agrees with its own FP32 source to `min_agreement` (no labels needed; val stays untouched). When
none does, each module scope is left in FP32 in turn to find the layers that break it, and the `exclude_worst`
worst stay FP32 in one last try.

Timing (stages/timing.py): every variant in a process of its own, at `threads` threads, in rotated rounds;
`latency_ms_p50`, a single-image service's case, decides. The chosen file's serving limit over batch sizes and
core splits (stages/throughput.py, on val's photos) goes into the card as "serving": the server's defaults.
"""
import csv
import dataclasses
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from stages import machine, quantize, runtime, throughput, timing, trust, trust_fit  # noqa: E402
from stages.candidates import BASELINE, FALLBACK, inputs, measure, source, variants  # noqa: E402
from stages.card import write_card  # noqa: E402
from stages.checkpoint import load_checkpoint, load_model  # noqa: E402
from stages.config import UserError, atomic_dir, cli, load_section, parser, typed  # noqa: E402
from stages.export import parity  # noqa: E402
from stages.manifest import read_manifest  # noqa: E402

# card facts kept out of the ONNX file's metadata: they change from run to run (timings, the git revision) or
# come after it (its hash), and the same inputs and choice must give the same model bytes
MEASURED = ("sha256", "git_rev", "reason", "metrics", "built_on", "serving")


@dataclasses.dataclass(frozen=True)
class Budget:
    max_accuracy_drop: float = 0.005   # val accuracy below the PyTorch FP32 model's, fraction
    min_agreement: float = 0.99        # val top-1 agreement with the PyTorch FP32 model
    min_speedup: float = 1.1           # batch-1 speed-up over ONNX FP32 a variant needs to replace it


@dataclasses.dataclass(frozen=True)
class Params:
    budget: dict = dataclasses.field(default_factory=dict)   # Budget's fields
    threads: int = 2                   # intra-op threads, ONNX Runtime and PyTorch alike
    batch_size: int = 32               # throughput batch; also the scoring batch
    warmup: int = 3                    # untimed runs per variant and batch size
    rounds: int = 5                    # interleaved rounds over all variants
    repeats: int = 20                  # timed batch-1 runs per variant per round
    batch_repeats: int = 2             # timed full-batch runs per variant per round
    int8: dict = dataclasses.field(default_factory=dict)   # quantize.Settings' fields
    tries: tuple = ({},)               # overrides of `int8`, tried in turn
    exclude_worst: int = 2             # every try failed: once more, this many worst module scopes in FP32
    diagnose: bool = True              # INT8 under the agreement budget: name the module scopes to blame
    seed: int = 0
    trust: dict = dataclasses.field(default_factory=dict)   # stages.trust.Targets' fields
    serving: dict = dataclasses.field(default_factory=dict)  # stages.throughput.Sweep's fields
    sizes: tuple = ()                  # more test sizes (px) of export's weights: onnx_fp32_<px>, onnx_int8_<px>

    def __post_init__(self):
        for name, cls in (("budget", Budget), ("trust", trust.Targets), ("serving", throughput.Sweep)):
            if not isinstance(getattr(self, name), cls):
                try:
                    object.__setattr__(self, name, cls(**typed(cls, getattr(self, name), f"deploy.{name}")))
                except (TypeError, ValueError) as e:
                    raise UserError(f"deploy.{name}: {e}") from None
        object.__setattr__(self, "tries", tuple(self.tries) or ({},))
        object.__setattr__(self, "sizes", tuple(self.sizes))
        if not all(isinstance(s, int) and 32 <= s <= 1024 for s in self.sizes) or len(set(self.sizes)) < len(
                self.sizes):
            raise UserError(f"deploy.sizes: distinct whole numbers of pixels, 32-1024, not {list(self.sizes)}")
        for t in self.tries:
            quantize.settings(self.int8, t)    # a misspelt key or value fails before any work


def select(variants, budget):
    """(chosen name, {name: reason}): the ONNX variant with the lowest batch-1 median latency that keeps
    the budget against `pytorch_fp32`; only `onnx_fp32` needs no speed-up. Plain dicts with `accuracy`,
    `agreement` and `latency_ms_p50` in, so it serves pytest as well as `run`."""
    b = budget if isinstance(budget, Budget) else Budget(**budget)
    base, fb = variants[BASELINE], variants[FALLBACK]
    reasons, ok = {BASELINE: "baseline: PyTorch eager, not an ONNX file"}, []
    for name, v in variants.items():
        if name == BASELINE:
            continue
        drop, (speed, n) = base["accuracy"] - v["accuracy"], timing.paired_speedup(v, fb)
        why = [f"agreement {v['agreement']:.4f} < {b.min_agreement}"] if v["agreement"] < b.min_agreement else []
        why += [f"accuracy drop {drop:.4f} > {b.max_accuracy_drop}"] if drop > b.max_accuracy_drop + 1e-9 else []
        if why:
            reasons[name] = "over budget: " + "; ".join(why)
        elif name != FALLBACK and speed < b.min_speedup:
            reasons[name] = (f"not faster: {speed:.2f}x {FALLBACK} at batch 1" + (f", lower quartile of {n} "
                             f"paired rounds" if n > 1 else "") + f" (needs {b.min_speedup}x)")
        else:
            ok.append(name)
    if FALLBACK not in ok:
        raise UserError(f"even {FALLBACK} misses the budget ({reasons[FALLBACK]}): ONNX Runtime and PyTorch "
                        "disagree; check the export stage's parity")
    chosen = min(ok, key=lambda n: variants[n]["latency_ms_p50"])
    for name in ok:
        reasons[name] = f"within budget, slower than {chosen}"
    reasons[chosen] = (f"chosen: fastest within budget, "
                       f"{base['latency_ms_p50'] / variants[chosen]['latency_ms_p50']:.2f}x {BASELINE} at batch 1")
    if chosen == FALLBACK and len(variants) > 2:
        reasons[FALLBACK] = "chosen: fallback, no faster variant within budget"
    return chosen, reasons


def git_rev():
    r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"


def run(checkpoint, onnx_path, pruned, manifest, out_dir, p):
    """Build, score, time, choose; write model.onnx, card.json, variants.json/.csv, tradeoff.png, report.json."""
    ckpt = load_checkpoint(checkpoint)
    model, classes, pp = load_model(ckpt)
    (val_rows, _), (hold_rows, _), (train, _) = (read_manifest(manifest, {s}) for s in ("val", "holdout", "train"))
    if not val_rows or not hold_rows or not train:
        raise UserError(f"{manifest}: deploy needs images in the train, holdout and val splits")
    cal_rows = quantize.calibration_rows(train, max(quantize.settings(p.int8, t).calibration_size for t in p.tries),
                                         p.seed)
    with tempfile.TemporaryDirectory(prefix="deploy-") as work:
        files, int8 = variants(checkpoint, onnx_path, pruned, Path(work), cal_rows, hold_rows, p)
        table, logits = measure(model, classes, pp, files, val_rows, p)
        chosen, reasons = select(table, p.budget)
        shipped, fitted, fit = trust_fit.trusted(model, ckpt, chosen, files[chosen], train, hold_rows,
                                                 Path(work) / "shipped.onnx", p)
        shipped_pp = runtime.metadata(runtime.session(shipped))[1]     # the chosen file's, its size included
        serving = throughput.measure(shipped, [Path(r["path"]).read_bytes()
                                               for r in val_rows[:p.serving.images]], p.serving)
        for n, v in table.items():
            v.update(within_budget=int(n == chosen or reasons[n].startswith("within")), chosen=int(n == chosen))
        for n, rec in int8.items():            # what quantization alone costs, against its own FP32 source
            rec["val_agreement_with_source"] = parity(logits[source(n)], logits[n])["top1_agreement"]
            if p.diagnose and rec["val_agreement_with_source"] < p.budget.min_agreement and not rec["diagnosis"]:
                cal_x, hold = inputs(cal_rows, hold_rows, classes, runtime.metadata(runtime.session(files[n]))[1],
                                     p.batch_size)
                rec["diagnosis"] = quantize.diagnose(files[source(n)], Path(work), cal_x,
                                                     quantize.settings(rec["settings"]), hold, p.threads)
        card = {"model": (Path(out_dir) / "model.onnx").as_posix(), "sha256": None, "variant": chosen,
                "reason": reasons[chosen], "classes": classes, "preprocessing": dataclasses.asdict(shipped_pp),
                "backbone": ckpt["backbone"], "calibration_sha256": int8.get(chosen, {}).get("calibration_sha256"),
                "quantization": int8.get(chosen, {}).get("settings"), "git_rev": git_rev(),
                "params": {"train": ckpt["params"], "deploy": dataclasses.asdict(p), "prune": (
                    load_checkpoint(pruned)["pruning"]["params"] if "pruned" in chosen else None)},
                "onnxruntime": ort.__version__, "built_on": machine.cpu(), "serving": serving,
                "trust": {**dataclasses.asdict(fitted), "fit": fit},
                "metrics": {**{k: table[chosen][k] for k in ("accuracy", "agreement", "latency_ms_p50",
                                                             "throughput_b1", "speedup_b1", "speedup_fp32_q1")},
                            "speedup_margin": None if chosen == FALLBACK else   # how far clear of the rule
                            round(table[chosen]["speedup_fp32_q1"] - p.budget.min_speedup, 3)}}
        report = {"chosen": chosen, "reasons": reasons, "budget": dataclasses.asdict(p.budget),
                  "val_images": len(val_rows), "threads": p.threads, "int8": int8,
                  "calibration_images": [r["sha256"] for r in cal_rows]}
        card, report = json.loads(json.dumps(card)), json.loads(json.dumps(report))   # tuples as JSON lists
        write(out_dir, shipped, files["onnx_int8"], card, table, reasons, report)
    return card, table, report


def write(out_dir, chosen_file, int8_file, card, table, reasons, report):
    """The chosen ONNX file with the card's facts in its metadata, then the card (with its SHA-256), the
    variant table as JSON (for `dvc metrics`) and CSV, the trade-off plot and the selection report; and
    `onnx_int8.onnx`, export's file quantized as scored here, shipped or not: the trust stage compares its
    robustness to corruptions with FP32's."""
    with atomic_dir(out_dir) as tmp:
        ship(chosen_file, tmp / "model.onnx", card)
        shutil.copyfile(int8_file, tmp / "onnx_int8.onnx")
        card.update(write_card(tmp / "card.json", card, file=tmp / "model.onnx"))
        (tmp / "variants.json").write_text(json.dumps(table, indent=2) + "\n")
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        cols = [c for c, v in next(iter(table.values())).items() if not isinstance(v, list)]   # rounds: JSON
        with open(tmp / "variants.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["variant", *cols, "reason"])
            w.writerows([n, *(v[c] for c in cols), reasons[n]] for n, v in table.items())
        plot(table, card["variant"], report["budget"], tmp / "tradeoff.png")


def ship(chosen_file, path, card):
    """`chosen_file` to `path` with the card's facts (all but MEASURED) in its metadata; sets card["opset"]."""
    m = onnx.load(str(chosen_file))
    card["opset"] = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    facts = {k: v if isinstance(v, str) else json.dumps(v) for k, v in card.items() if k not in MEASURED}
    props = {e.key: e.value for e in m.metadata_props} | facts
    del m.metadata_props[:]
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))


def plot(table, chosen, budget, path):
    """Accuracy against batch-1 latency and against file size, one point per variant."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    floor = table[BASELINE]["accuracy"] - budget["max_accuracy_drop"]
    for ax, key, label in ((axes[0], "latency_ms_p50", "batch-1 latency, median (ms)"),
                           (axes[1], "size_mb", "file size (MB)")):
        for n, v in table.items():
            ax.scatter(v[key], v["accuracy"], marker="*" if n == chosen else "o", s=160 if n == chosen else 50)
            ax.annotate(n, (v[key], v["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.axhline(floor, ls="--", c="grey", lw=1, label="accuracy budget")
        ax.set(xlabel=label, xscale="log" if key.startswith("latency") else "linear")
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="val accuracy", title=f"deploy: {chosen} (star)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def arguments():
    """The stage's command line (stages/recheck.py parses dvc.yaml's `cmd` with it too)."""
    ap = parser(__doc__, "--checkpoint", "--onnx", "--manifest", "--out")
    ap.add_argument("--pruned", help="a checkpoint written by the prune stage: adds pruned_fp32, pruned_int8")
    return ap


def main():
    args = arguments().parse_args()
    card, table, _ = run(args.checkpoint, args.onnx, args.pruned, args.manifest, args.out,
                         load_section(Params, "deploy"))
    for n, v in table.items():
        print(f"deploy: {n:<13} accuracy {v['accuracy']:.4f} agreement {v['agreement']:.4f} batch-1 p50 "
              f"{v['latency_ms_p50']:8.2f} ms ({v['speedup_b1']:.2f}x; after a batch "
              f"{v['latency_ms_p50_after_batch']:.2f} ms) {v['size_mb']:7.2f} MB")
    print(f"deploy: {card['variant']}: {card['reason']}")
    best = card["serving"]["best"]
    print(f"deploy: serving limit {best['img_s']} img/s in process (decode included) at batch {best['batch']}, "
          f"{best['lanes']} lane(s) x {best['threads']} thread(s): the server's defaults on this CPU")


if __name__ == "__main__":
    cli(main)
