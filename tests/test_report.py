"""The report page, built from real stage outputs and opened in real headless Chromium (Debian's package)."""
import base64
import io
import json
import re
import shutil
import subprocess

import pytest
from PIL import Image

from stages import evaluate, explain, export, labels, report, train
from tests.conftest import TINY

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SECTIONS = ("metrics", "confusion", "labels", "gradcam", "hardest", "deploy", "trust")


def chromium(page, *args):
    """(what Chromium printed on stderr, its stdout) after loading `page`; --v=0 logs every console message."""
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                        "--v=0", *args, page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stderr, r.stdout


def console(stderr):
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture(scope="module")
def stage_outputs(tmp_path_factory):
    """labels, export, evaluate and explain run for real on the generated red/blue images."""
    from stages import prepare
    from tests.conftest import make_split_folder
    tmp = tmp_path_factory.mktemp("report")
    src = make_split_folder(tmp / "split", 10, 4)
    prepare.run(src, tmp / "prepare", prepare.Params(source=str(src)))
    manifest = tmp / "prepare" / "manifest.csv"
    tp = train.Params(**{**TINY, "strategy": "linear_probe", "lp_cs": (0.1, 1.0)})
    labels.run(manifest, tmp / "labels", labels.Params(), tp)
    train.run(manifest, tmp / "train", tp)
    ckpt = tmp / "train" / "model.pt"
    export.run(ckpt, manifest, tmp / "export", export.Params())
    evaluate.run(ckpt, tmp / "export" / "model.onnx", manifest, tmp / "evaluate", evaluate.Params())
    explain.run(ckpt, manifest, tmp / "explain", explain.Params(images=4))
    return tmp


def build(tmp, out, trust=None):
    return report.run(out, tmp / "evaluate", tmp / "labels", tmp / "explain", tmp / "no-deploy", trust,
                      report.Params(thumb_px=48))


def test_the_page_renders_in_chromium_with_every_section_and_no_console_message(stage_outputs, tmp_path):
    page, line = build(stage_outputs, tmp_path / "r")
    assert "val accuracy" in line and "suspected mislabels" in line
    stderr, dom = chromium(page, "--dump-dom")
    assert console(stderr) == [], console(stderr)
    assert re.findall(r'<section id="(\w+)"', dom) == list(SECTIONS)
    assert "no trust outputs" in dom and "card.json not found" in dom      # absent inputs: a note, no failure
    srcs = re.findall(r'<img[^>]* src="([^"]+)"', dom)
    assert len(srcs) >= 2 + 8                  # confusion, Grad-CAM and a thumbnail per val image (top losses)
    for src in srcs:                           # nothing to fetch: every image inline and decodable
        assert src.startswith("data:image/")
        Image.open(io.BytesIO(base64.b64decode(src.partition(",")[2]))).verify()
    shot = tmp_path / "shot.png"
    chromium(page, f"--screenshot={shot}", "--window-size=1200,2000")
    with Image.open(shot) as im:
        lo, hi = im.convert("L").getextrema()
        assert im.size == (1200, 2000) and hi - lo > 100             # not a blank page


def test_trust_outputs_are_shown_when_present(stage_outputs, tmp_path):
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "metrics.json").write_text(json.dumps({"ece": 0.031, "ood": {"auroc": 0.87}}))
    shutil.copy(stage_outputs / "evaluate" / "confusion.png", trust / "reliability.png")
    page, _ = build(stage_outputs, tmp_path / "r", trust)
    text = page.read_text()
    trust_part = text[text.index('<section id="trust">'):]
    assert "ood.auroc" in trust_part and "0.87" in trust_part and 'alt="reliability"' in trust_part


def test_the_console_check_sees_an_error(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><script>console.error("broken")</script></body></html>')
    assert any('"broken"' in line for line in console(chromium(page, "--dump-dom")[0]))


@pytest.mark.slow
def test_the_pipeline_ends_with_the_report(reproduced):
    repo, out = reproduced
    for stage in ("labels", "explain", "report"):
        assert f"Running stage '{stage}'" in out
    page = repo / "outputs/report/index.html"
    stderr, dom = chromium(page, "--dump-dom")
    assert console(stderr) == [] and re.findall(r'<section id="(\w+)"', dom) == list(SECTIONS)
    card = json.loads((repo / "outputs/deploy/card.json").read_text())
    assert f"shipped variant <b>{card['variant']}</b>" in dom
    assert "report: outputs/report/index.html: val accuracy" in out


def test_the_shipped_sections_load():
    from stages.config import load_section
    from tests.conftest import ROOT
    for cls, section in [(labels.Params, "labels"), (explain.Params, "explain"), (report.Params, "report")]:
        assert load_section(cls, section, ROOT / "params.yaml") == cls()     # the dataclass defaults, as shipped
