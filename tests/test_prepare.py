import csv
from collections import Counter

import pytest

from stages import prepare
from stages.config import UserError
from tests.conftest import make_image


def splits(rows):
    return Counter((r["split"], r["label"]) for r in rows if r["status"] == "ok")


def test_keeps_the_sources_own_splits(tmp_path, split_folder):
    rows = prepare.run(split_folder, tmp_path / "out", prepare.Params(source=str(split_folder)))
    c = splits(rows)
    assert c[("val", "red")] == c[("val", "blue")] == 4
    assert c[("holdout", "red")] == c[("holdout", "blue")] == 2          # 20 % of 10 train images
    assert c[("train", "red")] == c[("train", "blue")] == 8
    assert all("/val/" in r["path"] for r in rows if r["split"] == "val")


def test_stratified_split_is_seeded(tmp_path, folder):
    p = prepare.Params(source=str(folder), val_fraction=0.25, holdout_fraction=0.25)
    prepare.run(folder, tmp_path / "a", p)
    prepare.run(folder, tmp_path / "b", p)
    prepare.run(folder, tmp_path / "c", prepare.Params(source=str(folder), val_fraction=0.25,
                                                        holdout_fraction=0.25, seed=1))
    a, b, c = ([(r["path"], r["split"]) for r in csv.DictReader(open(tmp_path / d / "manifest.csv"))]
               for d in "abc")
    assert a == b and a != c
    rows = list(csv.DictReader(open(tmp_path / "a" / "manifest.csv")))
    assert splits(rows) == {("val", "red"): 3, ("val", "blue"): 3, ("holdout", "red"): 2,
                            ("holdout", "blue"): 2, ("train", "red"): 7, ("train", "blue"): 7}
    assert {len(r["sha256"]) for r in rows} == {64} and all(int(r["width"]) == 48 for r in rows)


def test_undecodable_files_are_set_aside_with_a_reason(tmp_path, folder):
    (folder / "red" / "note.jpg").write_text("not an image")
    good = make_image(folder / "blue" / "cut.jpg", (40, 40, 200), size=(200, 200), fmt="JPEG")
    good.write_bytes(good.read_bytes()[:600])      # truncated mid-scan
    rows = prepare.run(folder, tmp_path / "out", prepare.Params(source=str(folder)))
    dropped = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in rows if r["status"] == "dropped"}
    assert set(dropped) == {"note.jpg", "cut.jpg"}
    assert dropped == {"note.jpg": "not an image", "cut.jpg": dropped["cut.jpg"]}
    assert dropped["cut.jpg"].startswith("truncated or damaged")
    assert {r["split"] for r in rows if r["status"] == "dropped"} == {"none"}


def test_missing_source_and_empty_class_are_clear_errors(tmp_path, folder):
    with pytest.raises(UserError, match="source folder .* does not exist"):
        prepare.run(tmp_path / "nope", tmp_path / "out", prepare.Params(source="nope"))
    (folder / "green").mkdir()
    with pytest.raises(UserError, match="class folder .*green' is empty"):
        prepare.run(folder, tmp_path / "out", prepare.Params(source=str(folder)))
    assert not (tmp_path / "out" / "manifest.csv").exists()
