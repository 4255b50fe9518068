"""Batch prediction on Ray Data (serve/batch.py): the tiny exported model of test_serve, the session's local Ray."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve import batch, parts, predict_folder
from serve.model import Params
from stages.config import UserError
from tests.conftest import ROOT
from tests.test_serve import (PNG, PROBES, card, check_prediction, encode, offline, png_header,  # noqa: F401
                              write_card)

P = Params(batch_size=2, batch_part_rows=4, top_k=2, max_body_bytes=200_000, max_pixels=1_000_000)


def probes(folder, n=len(PROBES)):
    """`n` usable images in two subfolders, PROBES first, then fresh JPEGs."""
    for i in range(n):
        data = PROBES[i][0] if i < len(PROBES) else encode((40 + 7 * i, 60, 200 - 5 * i), (40, 40), "JPEG", seed=i)
        (folder / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"sub{i % 2}" / f"{i}.img").write_bytes(data)
    return folder


def tables(folder):
    return [pq.read_table(folder / name).to_pylist() if (folder / name).exists() else []
            for name in (parts.PREDICTIONS, parts.ERRORS)]


def test_ray_data_matches_offline_onnx_runtime_and_the_single_process_csv(card, ray_local, tmp_path):
    images = probes(tmp_path / "images")
    classes, probs = offline(card)
    counts = batch.run(card, images, tmp_path / "out", P)
    assert counts == {"skipped": 0, "predicted": len(PROBES), "errors": 0}
    preds, errors = tables(tmp_path / "out")
    sha = json.loads(card.read_text())["sha256"]
    assert not errors and {r["model_sha256"] for r in preds} == {sha}
    by_path = {r["path"]: r for r in preds}
    for i, p in enumerate(probs):
        r = by_path[f"sub{i % 2}/{i}.img"]
        check_prediction({"top_k": [{"class": c, "probability": q} for c, q in
                                    zip(r["top_k_classes"], r["top_k_probabilities"])]}, classes, p)
        assert r["top1"] == classes[p.argmax()]
    # OUT=x.csv: predict_folder's columns and values, plus the model's SHA-256
    batch.run(card, images, tmp_path / "ray.csv", P)
    predict_folder.run(card, images, tmp_path / "single.csv", P)
    with open(tmp_path / "ray.csv", newline="") as f, open(tmp_path / "single.csv", newline="") as g:
        ray_rows, single = list(csv.DictReader(f)), list(csv.DictReader(g))
    same = ("path", "top1", "abstained", "reason", "error")
    assert [[r[c] for c in same] for r in ray_rows] == [[r[c] for c in same] for r in single]
    for r, s in zip(ray_rows, single):          # batches differ, so ONNX Runtime's last bits may too
        assert abs(float(r["probability"]) - float(s["probability"])) < 1e-5
        assert [c["class"] for c in json.loads(r["top_k"])] == [c["class"] for c in json.loads(s["top_k"])]
    assert {r["model_sha256"] for r in ray_rows} == {sha}


def test_the_bad_input_zoo_lands_in_the_errors_table_and_the_job_finishes(card, ray_local, tmp_path):
    images = probes(tmp_path / "images", 3)
    zoo = {  # file: (error kind, words in the reason), what the server answers for the same bytes
        "not_an_image.jpg": (b"hello, world" * 10, "not_an_image", "not an image"),
        "truncated.png": (PNG[:len(PNG) // 2], "corrupt_image", "truncated"),
        "empty.jpg": (b"", "empty_image", "zero bytes"),
        "too_big.png": (os.urandom(P.max_body_bytes + 1), "body_too_large", f"limit of {P.max_body_bytes:,}"),
        "bomb.png": (png_header(2000, 2000), "image_too_large", "2000x2000 = 4,000,000 pixels"),
        "bomb_past_pil.png": (png_header(100_000, 100_000), "image_too_large", "decompression bomb"),
        "eps.eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not_an_image", "not an image"),
    }
    for name, (data, _, _) in zoo.items():
        (images / "bad" / name).parent.mkdir(exist_ok=True)
        (images / "bad" / name).write_bytes(data)
    os.mkfifo(images / "bad" / "fifo")           # reading it would block forever
    counts = batch.run(card, images, tmp_path / "out", P)
    assert counts == {"skipped": 0, "predicted": 3, "errors": len(zoo) + 1}
    preds, errors = tables(tmp_path / "out")
    assert len(preds) == 3 and all(r["top1"] for r in preds)
    by_path = {r["path"]: r for r in errors}
    assert by_path.pop("bad/fifo")["kind"] == "not_a_file"
    for name, (_, kind, words) in zoo.items():
        r = by_path[f"bad/{name}"]
        assert r["kind"] == kind and words in r["error"], r


KILLER = """
import os, signal, sys
from serve import batch
from serve.model import Params
write_part, written = batch.write_part, []
def write_then_die(*args):          # a real SIGKILL after the second part: no cleanup runs
    write_part(*args)
    written.append(1)
    if len(written) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
batch.write_part = write_then_die
batch.run(sys.argv[1], sys.argv[2], sys.argv[3], Params(**eval(sys.argv[4])))
"""


@pytest.mark.slow
def test_a_job_killed_halfway_is_resumed_scoring_only_the_rest(card, ray_local, tmp_path):
    images, out = probes(tmp_path / "images", 20), tmp_path / "out"
    args = dict(batch_size=2, batch_part_rows=4, top_k=2)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLER), str(card), str(images), str(out), repr(args)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    done = {row["path"] for row in tables(out)[0]}
    assert len(done) == 8                       # two whole parts of 4, nothing half-written readable
    counts = batch.run(card, images, out, Params(**args))
    assert counts == {"skipped": 8, "predicted": 12, "errors": 0}
    paths = [row["path"] for row in tables(out)[0]]
    assert len(paths) == len(set(paths)) == 20
    assert batch.run(card, images, out, Params(**args)) == {"skipped": 20, "predicted": 0, "errors": 0}


GATED = """
import os, sys, time
from pathlib import Path
import fsspec
import pyarrow.fs as pafs
from serve import batch
from serve.model import Params
card, images, out, args, last = sys.argv[1:]
marker = out + ".first-part"
class Gated(pafs.FSSpecHandler):    # in the actor: reading `last` waits until the driver has written a part
    def __init__(self, fs, last, marker):
        super().__init__(fs)
        self.last, self.marker = last, marker
    def open_input_stream(self, path):
        while path.endswith(self.last) and not os.path.exists(self.marker):
            time.sleep(0.05)
        return super().open_input_stream(path)
batch.filesystem = lambda uri: (pafs.PyFileSystem(Gated(fsspec.filesystem("file"), last, marker)), uri)
write_part = batch.write_part
def write_then_open_the_gate(*a):
    write_part(*a)
    Path(marker).touch()
batch.write_part = write_then_open_the_gate
print(batch.run(card, images, out, Params(**eval(args))))
"""


@pytest.mark.slow
def test_each_part_is_written_as_soon_as_its_rows_are_scored(card, ray_local, tmp_path):
    """Parts reach the disk while the job runs, not all at its end: what a crash loses is at most a part. The
    job's last file cannot be read until a part is on disk; the other lane's block of 32 rows fills a part of 20
    (Ray Data bundles blocks into batches of ROWS: two blocks of fewer rows would be one call). With Ray Data's
    default prefetch a batch of rows is held back until the next one is ready too: a 2,000-image job wrote both
    of its 1,000-row parts at its very end, and this job never finishes."""
    images, out = probes(tmp_path / "images", 2 * batch.ROWS), tmp_path / "out"
    args = dict(batch_size=1, batch_part_rows=20, top_k=2)     # calls of one image: runners of one session
    assert batch.cpu_actors([2], Params(**args)) == (1, 2)     # two blocks of ROWS rows, scored at once
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    last = sorted(str(f.relative_to(images)) for f in images.rglob("*.img"))[-1]
    try:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(GATED), str(card), str(images), str(out),
                            repr(args), last], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("no part was written before the job's last file was read: parts are held to the job's end")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == str({"skipped": 0, "predicted": 2 * batch.ROWS, "errors": 0})
    assert len(list((out / parts.PREDICTIONS).glob("part-*.parquet"))) == 4        # 20 + 20 + 20 + 4


def test_the_card_is_checked_and_another_models_results_are_not_mixed_in(card, tmp_path):
    images = probes(tmp_path / "images", 2)
    forged = tmp_path / "card.json"
    forged.write_text(json.dumps({**json.loads(card.read_text()), "sha256": "0" * 64}))
    with pytest.raises(UserError, match="refusing to serve"):
        batch.run(forged, images, tmp_path / "out", P)
    assert not (tmp_path / "out").exists()
    (tmp_path / "out" / "predictions").mkdir(parents=True)
    pq.write_table(pa.table({"path": ["x"], "model_sha256": ["f" * 64]}),
                   tmp_path / "out" / "predictions" / "part-00000.parquet")
    with pytest.raises(UserError, match="another output"):
        batch.run(card, images, tmp_path / "out", P)


def test_an_actors_onnx_runtime_calls_take_the_cards_fastest_batch_for_its_threads(card, tmp_path):
    """batch_size 0: the size the deploy stage measured fastest for lanes of the actor's threads, if it measured
    this CPU with these cores; 8 otherwise; the Ray Data batch (ROWS) on a GPU. (A set batch_size is used as it
    is: the Ray Data tests above run calls of 2 within batches of ROWS.)"""
    from stages import machine, throughput
    cores = throughput.cores()
    if cores < 2:
        pytest.skip("needs 2 cores: one-thread and all-core lanes must differ")
    model = json.loads(card.read_text())["model"]
    one = {"batch": 4, "lanes": cores, "threads": 1, "decode_threads": cores, "img_s": 90.0}
    serving = {"cores": cores, "settings": [one, {**one, "batch": 1, "lanes": 1, "threads": cores, "img_s": 99.0}]}
    here = json.loads(write_card(tmp_path / "here.json", model, built_on=machine.cpu(), serving=serving).read_text())
    assert batch.call_size_here(here, threads=1, gpu=False) == 4        # not the overall best (1, on one lane)
    assert batch.call_size_here(here, threads=cores, gpu=False) == 1
    assert batch.call_size_here(here, threads=1, gpu=True) == batch.ROWS
    other = {**here, "built_on": {**machine.cpu(), "model": "Other CPU"}}
    assert batch.call_size_here(other, threads=1, gpu=False) == 8


def test_cpu_scoring_starts_an_actor_a_machine_with_a_lane_per_batch_threads_cpus():
    """(actors, lanes each) from each Ray node's CPUs: one worker process a machine imports Ray Data and loads the
    model, not one a lane; unequal machines get lanes of the smallest; `batch_actors` shares the lanes out."""
    assert batch.LANES_PER_ACTOR == 4
    assert batch.cpu_actors([2], P) == (1, 2)
    assert batch.cpu_actors([3, 3], P) == (2, 3)
    assert batch.cpu_actors([8, 8], P) == (4, 4)            # at most LANES_PER_ACTOR calls in one process
    assert batch.cpu_actors([3, 8], P) == (3, 3)            # lanes of the smaller machine
    assert batch.cpu_actors([0, 4], P) == (1, 4)            # a head node that runs nothing
    assert batch.cpu_actors([8], Params(batch_threads=2)) == (1, 4)
    with pytest.raises(UserError, match="serve.batch_threads is 2, but no machine"):
        batch.cpu_actors([1, 0], Params(batch_threads=2))
    assert batch.cpu_actors([2], Params(batch_actors=2)) == (2, 1)  # an actor a lane, as before


def test_the_server_does_not_import_ray():
    code = "import sys, serve.app, serve.predict_folder; print('ray' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_a_uri_lists_like_a_folder_through_pyarrow_or_fsspec(tmp_path):
    images = probes(tmp_path / "images", 3)
    local = batch.list_files(*batch.filesystem(images))
    assert [f["path"] for f in local[0]] == ["sub0/0.img", "sub0/2.img", "sub1/1.img"] and local[1] == []
    assert batch.list_files(*batch.filesystem(f"file://{images}")) == local             # pyarrow's own URI
    import fsspec
    mem = fsspec.filesystem("memory")                                                   # a filesystem only fsspec has
    for f in local[0]:
        mem.pipe(f"/bench/{f['path']}", (images / f["path"]).read_bytes())
    assert batch.list_files(*batch.filesystem("memory://bench")) == local
    with pytest.raises(UserError, match="no filesystem"):
        batch.filesystem("nosuchscheme://x")
    with pytest.raises(UserError, match="not a folder"):
        batch.list_files(*batch.filesystem(images / "sub0" / "0.img"))


@pytest.mark.slow
def test_the_deploy_model_on_the_val_folder_agrees_with_evaluate(reproduced, ray_local, tmp_path, monkeypatch):
    """The real pipeline's deploy card (a few shipped photos, real weights): Ray Data's top-1 on its val folder is
    evaluate's ONNX top-1 for every file evaluate scored, and its probability evaluate's confidence."""
    repo, _ = reproduced
    monkeypatch.chdir(repo)                     # the card names its model relative to the project root
    batch.run("outputs/deploy/card.json", "data/mini/val", tmp_path / "out", Params())   # call size from the card
    preds = {r["path"]: r for r in tables(tmp_path / "out")[0]}
    with open("outputs/evaluate/predictions.csv", newline="") as f:
        evaluated = {r["path"].removeprefix("data/mini/val/"): r for r in csv.DictReader(f)}
    assert len(evaluated) == 2 * 6 and set(evaluated) <= set(preds)
    card = json.loads(open("outputs/deploy/card.json").read())
    assert card["variant"] == "onnx_fp32"        # the fixture's budget ships the model evaluate scored
    temperature = card["trust"]["temperature"]
    for path, r in evaluated.items():
        assert preds[path]["top1"] == r["onnx_predicted"], path
        # evaluate's confidence is the plain softmax (it runs before deploy fits the temperature); with two
        # classes the served logit gap is evaluate's over T, up to evaluate's rounding to 4 decimals
        p, q = float(r["confidence"]), preds[path]["probability"]
        if p < 0.9999:
            assert abs(math.log(q / (1 - q)) * temperature - math.log(p / (1 - p))) <= 1e-4 / (p * (1 - p)) + 1e-3, path
