import csv
import dataclasses
import fcntl
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from stages import inspection, prepare
from stages.config import UserError
from stages.manifest import read_manifest
from tests.conftest import make_image
from tests.test_cleaning import dirty  # noqa: F401  (a fixture: one file for every cleaning case)


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


def kept_rows_have_their_cached_copy(rows):
    kept = [r for r in rows if r["status"] == "ok"]
    return kept and all(Path(r["cached"]).is_file() for r in kept)


def test_exact_copies_within_and_across_splits_go_through_to_a_model(tmp_path, split_folder):
    from stages import train
    from tests.conftest import TINY
    shutil.copy(split_folder / "train/red/0.jpg", split_folder / "train/red/copy.jpg")      # within a split
    shutil.copy(split_folder / "val/blue/0.jpg", split_folder / "train/blue/leak.jpg")      # across splits
    rows = prepare.run(split_folder, tmp_path / "prepare", prepare.Params(source=str(split_folder)))
    rule = {r["path"].split("split/", 1)[1]: r["rule"] for r in rows if r["status"] == "dropped"}
    assert rule == {"train/red/copy.jpg": "duplicate", "train/blue/leak.jpg": "leakage"}
    assert kept_rows_have_their_cached_copy(rows)        # the kept copies share the dropped ones' cached file
    train.run(tmp_path / "prepare" / "manifest.csv", tmp_path / "train", train.Params(**TINY))
    assert (tmp_path / "train" / "model.pt").is_file()


def test_unreadable_files_and_bad_names_are_set_aside(tmp_path, folder, monkeypatch):
    (folder / "red" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")                   # a dangling link
    locked = make_image(folder / "blue" / "locked.png", (40, 40, 200))
    bad = Path(os.fsdecode(bytes(folder / "red") + b"/bad\xff.png"))                      # not valid UTF-8
    make_image(bad, (200, 40, 40))
    real_open = open

    def no_permission(path, *a, **k):   # root reads every file: PermissionError is simulated for one
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr(inspection, "open", no_permission, raising=False)
    rows = prepare.run(folder, tmp_path / "out", prepare.Params(source=str(folder)))
    aside = {r["path"].rsplit("/", 1)[1]: (r["rule"], r["reason"]) for r in rows if r["status"] == "dropped"}
    assert aside == {"gone.jpg": ("unreadable", "cannot be read: No such file or directory"),
                     "locked.png": ("unreadable", "cannot be read: Permission denied"),
                     "bad\\xff.png": ("bad_name", "file name is not valid UTF-8 (shown with \\x escapes): "
                                                  "rename it")}
    manifest = (tmp_path / "out" / "manifest.csv").read_text(encoding="utf-8")
    assert "bad\\xff.png" in manifest and "bad\\xff.png" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(UserError, match="prepare.rules.bad_name: 'keep' is not one of drop, fail"):
        prepare.Params(source="x", rules={"bad_name": "keep"})


def test_a_killed_runs_temporary_folders_are_removed_next_time(tmp_path, folder):
    out = tmp_path / "outputs" / "prepare"
    stale, live, other = (tmp_path / "outputs" / n for n in (".prepare.k1ll3d", ".prepare.l1ve", ".train.x"))
    for d in (stale, live, other):
        (d / "images").mkdir(parents=True)
        os.utime(d, (time.time() - 60, time.time() - 60))
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)                      # what a prepare still running holds
    try:
        prepare.run(folder, out, prepare.Params(source=str(folder)))
    finally:
        os.close(fd)
    assert not stale.exists() and live.exists() and other.exists() and (out / "manifest.csv").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == [".prepare.l1ve", ".train.x", "prepare"]


def layout_of(tmp_path, folders, n=6):
    root = tmp_path / "src"
    for k, f in enumerate(folders):
        for c, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
            for i in range(n):
                make_image(root / f / c / f"{i}.png", colour, seed=1000 * k + 100 * (c == "red") + i)
    return root


@pytest.mark.parametrize("folders, from_folder", [
    (("train", "valid", "test"), {"train": {"train", "holdout"}, "valid": {"val"}, "test": {"test"}}),
    (("validation", "test"), {"validation": {"train", "holdout", "val"}, "test": {"test"}}),
    (("train", "test"), {"train": {"train", "holdout", "val"}, "test": {"test"}}),
])
def test_split_folders_users_bring(tmp_path, folders, from_folder):
    root = layout_of(tmp_path, folders)
    rows = prepare.run(root, tmp_path / "out", prepare.Params(source=str(root)))
    got = {}
    for r in rows:
        got.setdefault(r["path"].split("src/", 1)[1].split("/")[0], set()).add(r["split"])
    assert got == from_folder
    assert {r["label"] for r in rows} == {"red", "blue"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| test | 6 | 6 |" in report and "kept apart" in report
    train_rows, _ = read_manifest(tmp_path / "out" / "manifest.csv", {"train", "holdout"})
    assert train_rows and not any("/test/" in r["path"] for r in train_rows)


@pytest.mark.parametrize("folders, message", [
    (("train", "val", "extra/ants"), r"class folder '.*train/blue' holds folders"),
    (("train", "red_herring"), r"mixes split folders \(train\) with other folders \(red_herring\)"),
    (("val", "validation"), r"two folders for split val \(val and validation\)"),
    (("test",), r"has only a test folder"),
])
def test_layouts_that_are_refused_say_what_was_found(tmp_path, folders, message):
    root = tmp_path / "src"
    for f in folders:
        if f == "extra/ants":
            make_image(root / "train" / "blue" / "nested" / "0.png", (40, 40, 200))
            continue
        for c in ("red", "blue"):
            make_image(root / f / c / "0.png", (200, 40, 40))
    with pytest.raises(UserError, match=message) as e:
        prepare.run(root, tmp_path / "out", prepare.Params(source=str(root)))
    if "holds folders" in message or "mixes" in message:
        assert "accepted layouts: <class>/<image>, or <split>/<class>/<image>" in str(e.value)


def written(out):
    """Every byte prepare wrote: manifest, report, cached copies and pair pictures."""
    return {f.relative_to(out).as_posix(): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}


def test_a_pool_and_its_cache_write_the_serial_runs_bytes(tmp_path, dirty, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out, cache = tmp_path / "out", tmp_path / "cache"
    prepare.run(dirty, out, prepare.Params(source=str(dirty)))
    serial = written(out)
    assert any(k.startswith("pairs/") for k in serial) and len(serial) > 20      # every rule's case is there
    p = prepare.Params(source=str(dirty), workers=2)
    pools, real = [], inspection._on_pool
    monkeypatch.setattr(inspection, "_on_pool", lambda *a: pools.append(a[2]) or real(*a))
    prepare.run(dirty, out, p, cache)                                            # two processes, cold cache
    assert written(out) == serial and pools == [2]
    prepare.run(dirty, out, p, cache)                                            # warm cache
    assert written(out) == serial


def test_on_ray_the_manifest_is_the_serial_ones(tmp_path, split_folder, ray_local, monkeypatch):
    out = tmp_path / "out"
    prepare.run(split_folder, out, prepare.Params(source=""))
    serial = written(out)
    monkeypatch.setenv("RAY_ADDRESS", "auto")          # ray_init reuses the session's local Ray
    monkeypatch.setattr(inspection, "_on_pool", None)   # not the process pool
    prepare.run(split_folder, out, prepare.Params(source="", workers=2), tmp_path / "cache")
    assert written(out) == serial


@pytest.fixture
def decoded(monkeypatch):
    """Names of the files decoded (not answered from the cache), in this process."""
    names, real = [], inspection._decode
    monkeypatch.setattr(inspection, "_decode", lambda path, row, p: names.append(path.name) or real(path, row, p))
    return names


def test_a_rerun_decodes_only_new_or_changed_files_and_equals_a_fresh_run(tmp_path, split_folder, decoded):
    out, cache, p = tmp_path / "out", tmp_path / "cache", prepare.Params(source="")
    prepare.run(split_folder, out, p, cache)
    assert len(decoded) == 28
    decoded.clear()
    make_image(split_folder / "train/red/new.jpg", (200, 40, 40), seed=77)           # added
    make_image(split_folder / "train/blue/3.jpg", (40, 40, 200), seed=999)            # changed
    (split_folder / "val/red/2.jpg").unlink()                                          # removed
    prepare.run(split_folder, out, p, cache)
    assert sorted(decoded) == ["3.jpg", "new.jpg"]
    again = written(out)
    prepare.run(split_folder, out, p)                                                   # from scratch
    assert written(out) == again
    assert len(list(cache.rglob("*.json"))) == 28                      # the removed file's entry is gone
    decoded.clear()
    prepare.run(split_folder, out, dataclasses.replace(p, near_distance=4, seed=3), cache)
    assert decoded == []                                               # params read after inspection
    for change in ({"cache_side": 24}, {"min_side": 20}, {"min_entropy": 1.0}, {"max_pixels": 10_000}):
        decoded.clear()
        rows = prepare.run(split_folder, out, dataclasses.replace(p, **change), cache)
        assert len(decoded) == 28, change                              # results depend on them: all decoded
    assert {r["width"] for r in rows} == {48}


def test_a_damaged_cache_entry_is_decoded_again_not_trusted(tmp_path, split_folder, decoded):
    out, cache, p = tmp_path / "out", tmp_path / "cache", prepare.Params(source="")
    prepare.run(split_folder, out, p, cache)
    fresh = written(out)
    entries = sorted(cache.rglob("*.json"))
    entries[0].write_bytes(entries[0].read_bytes()[:20])                              # cut short
    meta = json.loads(entries[1].read_text())
    meta["row"]["phash"] = "0" * 16                                                    # altered
    entries[1].write_text(json.dumps(meta))
    copy = entries[2].with_suffix(".jpg")
    copy.write_bytes(copy.read_bytes()[:100])                                          # its copy cut short
    meta = json.loads(entries[3].read_text())
    meta["row"]["width"] = "48"                                                        # a wrong type, summed
    meta["sum"] = inspection._summed(entries[3].stem, meta["row"], meta["copy"])
    entries[3].write_text(json.dumps(meta))
    (entries[4].parent / f".{entries[4].name}.1234.tmp").write_text("{")              # a write cut short
    decoded.clear()
    prepare.run(split_folder, out, p, cache)
    assert len(decoded) == 4
    assert written(out) == fresh
    assert not list(cache.rglob(".*.tmp"))


def test_workers_must_be_zero_or_more():
    with pytest.raises(UserError, match="prepare.workers: -1 is not 0"):
        prepare.Params(source="", workers=-1)
