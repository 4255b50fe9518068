"""validate: the real Great Expectations suite on small generated manifests (GX is imported once, ~6-8 s)."""
import hashlib
import html
import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest

from stages import validate
from stages.config import UserError
from tests.conftest import ROOT

PARAMS = validate.Params(classes=("ants", "bees"), min_per_class=2, max_imbalance=3.0, min_side=32, max_side=4096)


def rows(per_split=None, classes=("ants", "bees")):
    """Clean manifest rows: `per_split[split]` ok images per class, plus one dropped file."""
    per_split = per_split or {"train": 6, "holdout": 2, "val": 4}
    out = []
    for split, n in per_split.items():
        for label in classes:
            for k in range(n):
                i = len(out) + 1
                sha = hashlib.sha256(str(i).encode()).hexdigest()
                out.append(dict(path=f"data/{split}/{label}/{k}.jpg", label=label, split=split, width=320,
                                height=240, mode="RGB", format="JPEG", bytes=9000, sha256=sha, phash=f"{i:016x}",
                                status="ok", rule="", reason="", cached=f"cache/{i}.png", picture=sha))
    out.append(dict(path="data/train/ants/broken.jpg", label="ants", split="none", width=0, height=0, mode="",
                    format="", bytes=12, sha256=hashlib.sha256(b"x").hexdigest(), phash="", status="dropped",
                    rule="decode", reason="does not decode: UnidentifiedImageError", cached="", picture=""))
    return out


def write(tmp_path, data):
    path = tmp_path / "manifest.csv"
    pd.DataFrame(data).to_csv(path, index=False)
    return path


def text(fragment):
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", fragment))).strip()


def failed_in_docs(docs):
    """(column, rendered text) of every expectation the data docs mark failed, over all validation pages."""
    found = []
    for page in (docs / "validations").rglob("*.html"):
        for section in re.split(r'<div id="section-\d+"', page.read_text())[1:]:
            h5 = re.search(r"<h5[^>]*>(.*?)</h5>", section, re.S)
            cells = re.split(r'<td id="section-\d+-content-block-\d+-cell-\d+-(\d)"', section)
            for i in range(1, len(cells) - 4, 2):   # cells: [.., "1", status, "2", expectation, "3", observed]
                if cells[i] == "1" and "fa-times" in cells[i + 1] and cells[i + 2] == "2":
                    found.append((text(h5.group(1)) if h5 else "", text(cells[i + 3] + cells[i + 5])))
    return found


def test_a_clean_manifest_passes_and_writes_result_and_docs(tmp_path):
    out = tmp_path / "validate"
    s = validate.run(write(tmp_path, rows()), out, PARAMS)
    assert s["success"] and s["failed"] == [] and s["passed"] == s["expectations"] >= 14
    assert s["counts"] == {"train": {"ants": 6, "bees": 6}, "holdout": {"ants": 2, "bees": 2},
                           "val": {"ants": 4, "bees": 4}}                # the dropped row is not counted
    result = json.loads((out / "result.json").read_text())
    assert result["success"] is True
    assert {r["suite_name"] for r in result["results"].values()} == {"images", "classes"}
    assert json.loads((out / "summary.json").read_text()) == s
    assert (out / "docs" / "index.html").is_file() and failed_in_docs(out / "docs") == []
    assert not [p for p in out.iterdir() if p.name.startswith(".")]     # no temporary folder left behind


def changed(i, **columns):
    """Clean rows with row `i` (0-5 train ants, 6-11 train bees, ... 20-23 val bees) changed."""
    data = rows()
    data[i].update(columns)
    return data


def fewer(split, label, keep, per_split=None):
    """Clean rows keeping only `keep` ok images of `label` in `split`."""
    data, kept = rows(per_split), 0
    for r in list(data):
        if r["split"] == split and r["label"] == label:
            kept += 1
            if kept > keep:
                data.remove(r)
    return data


# name: (manifest rows, failing expectation type, its table.column, (docs section, text the docs show for it))
CASES = {
    "unexpected class": (lambda: changed(0, label="wasps"), "expect_column_values_to_be_in_set",
                         "images.label", ("label", "wasps")),
    "too few in a class": (lambda: fewer("val", "bees", 1), "expect_column_values_to_be_between",
                           "classes.val", ("val", "greater than or equal to 2")),
    "imbalance": (lambda: fewer("train", "bees", 2, {"train": 9, "holdout": 2, "val": 4}),   # 9 / 2 > 3
                  "expect_column_max_to_be_between", "classes.train_ratio",
                  ("train_ratio", "less than or equal to 3.0")),
    "sha256 shared by train and val": (lambda: changed(0, sha256=rows()[20]["sha256"]),
                                       "expect_column_values_to_be_between", "images.sha256_splits",
                                       ("sha256_splits", "less than or equal to 1")),
    "picture shared by train and val": (lambda: changed(3, picture=rows()[21]["picture"]),
                                        "expect_column_values_to_be_between", "images.picture_splits",
                                        ("picture_splits", "less than or equal to 1")),
    "width under min_side": (lambda: changed(1, width=10), "expect_column_values_to_be_between",
                             "images.width", ("width", "greater than or equal to 32")),
}


@pytest.mark.parametrize("case", CASES)
def test_a_failing_expectation_stops_with_its_name_and_shows_in_the_docs(tmp_path, case):
    make, kind, where, (column, shown) = CASES[case]
    out = tmp_path / "validate"
    with pytest.raises(UserError) as e:
        validate.run(write(tmp_path, make()), out, PARAMS)
    msg = str(e.value)
    assert f"{where} {kind}" in msg and str(out / "docs" / "index.html") in msg and "\n" not in msg
    assert json.loads((out / "result.json").read_text())["success"] is False    # written before raising
    failed = json.loads((out / "summary.json").read_text())["failed"]
    assert len(failed) == 1 and failed[0].startswith(f"{where} {kind}")
    assert (out / "docs" / "index.html").is_file()
    assert any(c == column and shown in t for c, t in failed_in_docs(out / "docs")), failed_in_docs(out / "docs")


def test_named_rows_and_observed_values_reach_the_message(tmp_path):
    data = changed(1, width=10)
    data[0]["label"] = "wasps"
    with pytest.raises(UserError, match=r"data/train/ants/1\.jpg=10") as e:
        validate.run(write(tmp_path, data), tmp_path / "v", PARAMS)
    assert "data/train/ants/0.jpg=wasps" in str(e.value)
    # The bad rows' class has one train image fewer, not a missing one: only the two row checks fail.
    assert "2 of " in str(e.value)


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        validate.run(tmp_path / "nope.csv", tmp_path / "v", PARAMS)
    old = pd.DataFrame(rows()).drop(columns=["phash", "mode"])
    old.to_csv(tmp_path / "old.csv", index=False)
    with pytest.raises(UserError, match="lacks column.*mode.*phash"):
        validate.run(tmp_path / "old.csv", tmp_path / "v", PARAMS)
    with pytest.raises(UserError, match="min_side"):
        validate.Params(min_side=500, max_side=100)
    assert validate.Params(classes=[0, 1], modes=["RGB", 1]).modes == ("RGB", "1")   # as YAML reads them


def test_the_cli_exits_2_with_one_error_line(tmp_path):
    (tmp_path / "params.yaml").write_text("validate:\n  classes: [ants, bees]\n  min_per_class: 2\n")
    write(tmp_path, changed(1, width=10))
    r = subprocess.run([sys.executable, "-m", "stages.validate", "--manifest", "manifest.csv", "--out", "v"],
                       cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: validation failed") and "images.width" in lines[0]
    assert (tmp_path / "v" / "docs" / "index.html").is_file()


def test_duplicates_kept_within_one_split_pass(tmp_path):
    """prepare.rules may keep duplicates; only the same content in two splits breaks the contract."""
    data = changed(0, sha256=rows()[1]["sha256"], phash=rows()[1]["phash"])      # both in train
    assert validate.run(write(tmp_path, data), tmp_path / "v", PARAMS)["success"] is True


def test_every_failure_names_its_fix(tmp_path):
    """Each expectation of the contract has a fix in its message; the imbalance one names classes and counts."""
    fixes = validate.fixes(pd.DataFrame({"label": ["ants", "bees"], "train": [9, 2]}), PARAMS)
    suites = validate.expectations(PARAMS)
    named = {(t, e.column if hasattr(e, "column") else None) for t, es in suites.items() for e in es}
    assert named <= set(fixes), named - set(fixes)
    with pytest.raises(UserError) as e:
        validate.run(write(tmp_path, fewer("train", "bees", 2, {"train": 9, "holdout": 2, "val": 4})),
                     tmp_path / "v", PARAMS)
    assert ("largest class 'ants' has 9 train images, smallest 'bees' 2: raise validate.max_imbalance (3), "
            "set train.balance to sampler or loss") in str(e.value)
    with pytest.raises(UserError, match=r"images.label .*fix: add the class to validate.classes"):
        validate.run(write(tmp_path, changed(0, label="wasps")), tmp_path / "w", PARAMS)


def test_the_same_inputs_give_the_same_bytes(tmp_path):
    m = write(tmp_path, rows())
    for d in ("a", "b"):
        validate.run(m, tmp_path / d, PARAMS)
    for name in ("result.json", "summary.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert "validation_time" not in (tmp_path / "a" / "result.json").read_text()


def test_a_test_split_is_counted_and_a_phash_match_alone_is_no_leakage(tmp_path):
    data = rows({"train": 6, "holdout": 2, "val": 4, "test": 3})
    data[0]["phash"] = data[20]["phash"]              # a pHash match prepare did not confirm: two pictures
    s = validate.run(write(tmp_path, data), tmp_path / "v", PARAMS)
    assert s["success"] and s["counts"]["test"] == {"ants": 3, "bees": 3}
