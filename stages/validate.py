"""validate: a Great Expectations suite over prepare's manifest; a failing suite stops the pipeline before train.

Only `ok` rows are checked (dropped ones already carry their reason). Two tables are validated: `images`
(one row per usable file) and `classes` (one row per class: ok images per split and the train imbalance).
GX's result goes to `<out>/result.json`, its HTML data docs to `<out>/docs/`, a small summary to
`<out>/summary.json` (deterministic, so `train` can depend on it without re-running on every validation).
`result.json` is stripped of GX's run ids and times: the same manifest and params give the same bytes.
Every failure names the params (or the data) that change its outcome.
"""
import dataclasses
import json
from pathlib import Path

import pandas as pd

from stages.config import UserError, atomic_dir, atomic_text, cli, load_section, parser

SPLITS = ("train", "holdout", "val")     # counted per class; a `test` split may be there too, read by no stage
COLUMNS = ("path", "label", "split", "width", "height", "mode", "sha256", "phash", "picture", "status")
VOLATILE = {"id", "validation_id", "checkpoint_id", "run_id", "validation_time", "ge_load_time"}
MODES = ("RGB", "L", "P", "RGBA", "LA", "PA", "CMYK", "I;16", "I", "1", "YCbCr")
# Which rows a failure names, per table: a file for `images`, a class for `classes`.
ROW_IDS = {"images": "path", "classes": "label"}


@dataclasses.dataclass(frozen=True)
class Params:
    classes: tuple = ()             # expected class names; empty: accept the classes found
    min_per_class: int = 2          # ok images per class in train and in val (holdout needs 1)
    max_imbalance: float = 3.0      # largest / smallest class in train
    min_side: int = 32              # pixel bounds on width and height
    max_side: int = 8192
    modes: tuple = MODES            # allowed original PIL modes

    def __post_init__(self):
        for name in ("classes", "modes"):   # YAML reads `[0, 1]` or mode `1` as numbers; the manifest has text
            if isinstance(getattr(self, name), str):
                raise UserError(f"validate.{name} must be a list, e.g. [{getattr(self, name)}]")
            object.__setattr__(self, name, tuple(str(v) for v in getattr(self, name)))
        if not 1 <= self.min_side <= self.max_side:
            raise UserError(f"validate: need 1 <= min_side <= max_side, got {self.min_side} and {self.max_side}")
        if self.min_per_class < 1 or self.max_imbalance < 1:
            raise UserError("validate: min_per_class and max_imbalance must be at least 1")


def load_tables(manifest, classes=()):
    """The manifest's ok rows, and ok images per class and split (zeros included) with the train ratio."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise UserError(f"manifest '{manifest}' not found: run the prepare stage first")
    # Strings everywhere (a phash of 16 digits must not become a number); empty cells stay "".
    rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in rows.columns]
    if missing:
        raise UserError(f"manifest '{manifest}' lacks column(s) {', '.join(missing)}: re-run prepare")
    try:
        rows[["width", "height"]] = rows[["width", "height"]].astype("int64")
    except ValueError as e:
        raise UserError(f"manifest '{manifest}': width/height are not all integers ({e})") from None
    images = rows[rows["status"] == "ok"].reset_index(drop=True)
    # Splits holding the same file, or the same picture as prepare confirmed it: 2 or more is leakage.
    for column in ("sha256", "picture"):
        images[f"{column}_splits"] = images.groupby(column)["split"].transform("nunique")
    # Expected classes, or every class named (one whose every file was dropped counts 0). A stray class is
    # the label check's to report: counting it too would only repeat that failure.
    labels = sorted(classes or set(rows["label"]))
    counts = (images[images["split"].isin(SPLITS)].groupby(["label", "split"]).size()
              .unstack("split").reindex(index=labels, columns=list(SPLITS)).fillna(0).astype("int64"))
    # Each class against the smallest (floored at 1: a class with none already fails the count checks).
    counts["train_ratio"] = counts["train"] / counts["train"].clip(lower=1).min()
    return images, counts.rename_axis(columns=None).reset_index()


def expectations(p):
    """The suite per table: value, range, set and uniqueness checks (type checks misbehave with pandas 3)."""
    import great_expectations.expectations as gxe

    side = dict(min_value=p.min_side, max_value=p.max_side)
    images = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=[*SPLITS, "test"]),
        gxe.ExpectColumnValuesToBeBetween(column="width", **side),
        gxe.ExpectColumnValuesToBeBetween(column="height", **side),
        gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=list(p.modes)),
        gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$"),
        gxe.ExpectColumnValuesToMatchRegex(column="phash", regex=r"^[0-9a-f]{16}$"),
        # The same file, or the same picture re-encoded, in two splits leaks; within one split, duplicates
        # are prepare's rules' call (a user may keep them). A pHash match alone is not the same picture.
        gxe.ExpectColumnValuesToBeBetween(column="sha256_splits", max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="picture_splits", max_value=1),
    ]
    if p.classes:
        images.insert(1, gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(p.classes)))
    classes = [
        gxe.ExpectTableRowCountToBeBetween(min_value=2),
        gxe.ExpectColumnValuesToBeBetween(column="train", min_value=p.min_per_class),
        gxe.ExpectColumnValuesToBeBetween(column="holdout", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="val", min_value=p.min_per_class),
        gxe.ExpectColumnMaxToBeBetween(column="train_ratio", max_value=p.max_imbalance),
    ]
    return {"images": images, "classes": classes}


def check(tables, suites, docs_dir):
    """Validate each table with its suite in an ephemeral GX context; data docs are built in `docs_dir`."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)   # no tqdm bars in DVC's log
    for site in list(context.get_config().data_docs_sites or {}):
        context.delete_data_docs_site(site)   # the default site is a temporary folder
    context.add_data_docs_site("validate", {
        "class_name": "SiteBuilder",
        # A relative base_directory is a ValueError: nothing here gives the site a root directory.
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
    source = context.data_sources.add_pandas("manifest")
    results = {}
    # One validation definition per table: a Checkpoint passes the same dataframe to all of them.
    for name, frame in tables.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=suites[name]))
        vd = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        results[name] = vd.run(batch_parameters={"dataframe": frame}, result_format={
            "result_format": "SUMMARY", "unexpected_index_column_names": [ROW_IDS[name]],
            "partial_unexpected_count": 20})
    context.build_data_docs(site_names=["validate"])
    return results


def describe(name, r, fixes):
    """One failed expectation: `table.column type (bounds): observed value` or the rows it names, and its fix."""
    cfg, res = r.expectation_config, r.result or {}
    column = cfg.kwargs.get("column")
    bounds = [f"{op} {cfg.kwargs[k]:g}" for op, k in ((">=", "min_value"), ("<=", "max_value"))
              if cfg.kwargs.get(k) is not None]
    where = f"{name}.{column or 'rows'} {cfg.type}" + (f" ({', '.join(bounds)})" if bounds else "")
    fix = f" (fix: {fixes[(name, column)]})" if (name, column) in fixes else ""
    if (r.exception_info or {}).get("raised_exception"):
        return f"{where}: raised {r.exception_info.get('exception_message')}{fix}"
    if "unexpected_count" not in res:
        return f"{where}: observed {res.get('observed_value')}{fix}"
    shown = []
    for row in res.get("partial_unexpected_index_list", [])[:3]:
        value = str(row.get(column))
        shown.append(f"{row.get(ROW_IDS[name])}={value[:12] + '...' if len(value) > 16 else value}")
    more = ", ..." if res["unexpected_count"] > len(shown) else ""
    return f"{where}: {res['unexpected_count']} unexpected, {', '.join(shown)}{more}{fix}"


def fixes(counts, p):
    """(table, column) -> what changes the outcome of that expectation, in the params or the data."""
    train = counts.set_index("label")["train"]
    big, small = (train.idxmax(), train.idxmin()) if len(train) else ("-", "-")
    few = "add images to those classes, or lower validate.min_per_class"
    return {
        ("images", None): "no usable image: prepare's report.md says why each file was set aside",
        ("images", "label"): "add the class to validate.classes (or set it to [] to accept the classes found), "
                             "or remove its folder",
        ("images", "split"): "re-run prepare: its manifest has only train, holdout, val and test",
        ("images", "width"): f"change validate.min_side/max_side ({p.min_side}-{p.max_side} px), or let "
                             "prepare.min_side set small images aside",
        ("images", "height"): f"change validate.min_side/max_side ({p.min_side}-{p.max_side} px), or let "
                              "prepare.min_side set small images aside",
        ("images", "mode"): "add the mode to validate.modes (prepare converts every mode to RGB)",
        ("images", "sha256"): "the manifest is damaged: re-run prepare",
        ("images", "phash"): "the manifest is damaged: re-run prepare",
        ("images", "sha256_splits"): "the same file in two splits: set prepare.rules.leakage to drop "
                                     "(the val or test copy stays)",
        ("images", "picture_splits"): "the same picture in two splits: set prepare.rules.leakage to drop "
                                      "(the val or test copy stays)",
        ("classes", None): "at least 2 classes are needed: add a class folder",
        ("classes", "train"): f"{few} ({p.min_per_class}), or lower prepare.holdout_fraction",
        ("classes", "holdout"): "add train images to those classes, or raise prepare.holdout_fraction",
        ("classes", "val"): f"{few} ({p.min_per_class}), or raise prepare.val_fraction where prepare carves val",
        ("classes", "train_ratio"): f"largest class '{big}' has {train.get(big, 0)} train images, smallest "
                                    f"'{small}' {train.get(small, 0)}: raise validate.max_imbalance "
                                    f"({p.max_imbalance:g}), set train.balance to sampler or loss so training "
                                    f"counters it, or add images to '{small}'",
    }


def stable(result):
    """GX's result without its run ids and times (VOLATILE keys), so that the same inputs give the same bytes."""
    if isinstance(result, dict):
        return {k: stable(v) for k, v in result.items() if k not in VOLATILE}
    if isinstance(result, list):
        return [stable(v) for v in result]
    return result


def run(manifest, out_dir, p):
    """Validate `manifest`; write result.json, summary.json and docs/ under `out_dir`. Raises when it fails."""
    out_dir = Path(out_dir)
    images, counts = load_tables(manifest, p.classes)
    with atomic_dir(out_dir / "docs") as docs:
        results = check({"images": images, "classes": counts}, expectations(p), docs)
    report = {name: stable(r.to_json_dict()) for name, r in results.items()}
    hints = fixes(counts, p)
    failed = [describe(name, r, hints) for name, res in results.items() for r in res.results if not r.success]
    n = sum(len(res.results) for res in results.values())
    summary = {"success": not failed, "expectations": n, "passed": n - len(failed), "failed": failed,
               "counts": {s: dict(zip(counts["label"], counts[s].tolist())) for s in SPLITS}}
    test = images[images["split"] == "test"]
    if len(test):
        summary["counts"]["test"] = {label: int((test["label"] == label).sum()) for label in counts["label"]}
    atomic_text(out_dir / "result.json", json.dumps(
        {"success": summary["success"], "statistics": {k: summary[k] for k in ("expectations", "passed")},
         "results": report}, indent=1))
    atomic_text(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    if failed:
        raise UserError(f"validation failed, {len(failed)} of {n} expectations: {'; '.join(failed)}. "
                        f"Data docs: {out_dir / 'docs' / 'index.html'}")
    return summary


def main():
    args = parser(__doc__, "--manifest", "--out").parse_args()
    s = run(args.manifest, args.out, load_section(Params, "validate"))
    per_split = ", ".join(f"{split} {sum(c.values())}" for split, c in s["counts"].items())
    print(f"validate: {s['expectations']} expectations passed on {len(s['counts']['train'])} classes "
          f"({per_split}); data docs: {Path(args.out) / 'docs' / 'index.html'}")


if __name__ == "__main__":
    cli(main)
