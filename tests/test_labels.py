import csv

import pytest

from stages import labels, prepare, prune, train
from stages.manifest import read_manifest, read_paths
from tests.conftest import TINY, make_image

COLORS = {"blue": (40, 40, 200), "green": (40, 180, 40), "red": (200, 40, 40)}
N_TRAIN = 40                       # per class; every 20th filed under the next class: 5 % flipped
TP = train.Params(**{**TINY, "lp_cs": (0.1, 1.0)})    # two C values: the cross-validation costs seconds each


@pytest.fixture(scope="module")
def flipped(tmp_path_factory):
    """A manifest where 5 % of the train images are filed under the wrong class; (manifest, flipped paths)."""
    root, names, wrong = tmp_path_factory.mktemp("flipped") / "data", list(COLORS), set()
    for k, (c, color) in enumerate(COLORS.items()):
        for i in range(N_TRAIN):
            filed = names[(k + 1) % len(names)] if i % 20 == 0 else c
            path = make_image(root / "train" / filed / f"{c}{i}.png", color, seed=100 * k + i)
            if filed != c:
                wrong.add(str(path))
        for i in range(4):
            make_image(root / "val" / c / f"{i}.png", color, seed=5000 + 100 * k + i)
    make_image(root / "val" / "red" / "blue_in_red.png", COLORS["blue"], seed=9999)    # a val mislabel
    out = root.parent / "prepare"
    prepare.run(root, out, prepare.Params(source=str(root)))
    return out / "manifest.csv", wrong


def read(path):
    return list(csv.DictReader(open(path, newline="")))


def test_the_flipped_labels_lead_the_list_and_drop_leaves_them_out(tmp_path, flipped):
    manifest, wrong = flipped
    metrics, issues = labels.run(manifest, tmp_path / "l", labels.Params(label_issue="drop"), TP)
    ranked = [r for r in issues if r["split"] != "val"]
    top = {r["path"] for r in ranked[:2 * len(wrong)]}                  # the top 2 x 5 %
    assert len(wrong) == 6 and len(top & wrong) >= 0.8 * len(wrong), (wrong, ranked[:12])
    for r in ranked:
        if r["path"] in wrong:      # the file name starts with the colour it really is
            assert r["path"].rpartition("/")[2].startswith(r["suggested"]) and r["label"] != r["suggested"]
    assert read(tmp_path / "l" / "issues.csv")[0].keys() >= {"path", "split", "label", "suggested", "rank"}
    assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
    val = [r for r in issues if r["split"] == "val"]
    assert [r["path"].rpartition("/")[2] for r in val] == ["blue_in_red.png"]     # reported, never dropped
    assert val[0]["action"] == "report" and val[0]["suggested"] == "blue"
    # only the ones confident learning also flags are dropped; the rest of the list is kept for a person to look at
    excluded = {r["path"] for r in read(tmp_path / "l" / "exclude.csv")}
    assert excluded == {r["path"] for r in ranked if r["confident"] == "yes"} and wrong <= excluded
    assert {r["action"] for r in ranked if r["confident"] == "no"} <= {"keep"}
    assert metrics["dropped"] == len(excluded) == metrics["confident"] <= metrics["suspects"] == len(ranked)
    assert (tmp_path / "l" / "suspects.png").read_bytes()[:4] == b"\x89PNG"
    # train leaves the excluded rows out before anything else: with every holdout image excluded, it stops
    hold, _ = read_manifest(manifest, {"holdout"})
    with pytest.raises(train.UserError, match="both the train and holdout splits"):
        train.run(manifest, tmp_path / "t", train.Params(**TINY), exclude=[r["path"] for r in hold])
    with pytest.raises(train.UserError, match="both the train and holdout splits"):     # and so does prune
        prune.run(tmp_path / "l" / "none.pt", manifest, tmp_path / "p", prune.Params(), exclude=[r["path"] for r in hold])
    assert read_paths(tmp_path / "l" / "exclude.csv") == [r["path"] for r in read(tmp_path / "l" / "exclude.csv")]


def test_keep_and_fail(tmp_path, flipped):
    manifest, wrong = flipped
    with pytest.raises(labels.UserError, match=r"^\d+ train/holdout image\(s\) look mislabelled .*issues.csv"):
        labels.run(manifest, tmp_path / "f", labels.Params(label_issue="fail"), TP)
    kept = read(tmp_path / "f" / "issues.csv")                  # the list is there to read
    assert wrong <= {r["path"] for r in kept} and read(tmp_path / "f" / "exclude.csv") == []
    with pytest.raises(labels.UserError, match="'delete' is not one of keep, drop, fail"):
        labels.Params(label_issue="delete")
