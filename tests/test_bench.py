"""The benchmark harness end to end with --quick: every part runs and is reported. No figure is asserted."""
import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

PARTS = ("train", "scratch", "deploy", "overhead", "serving")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return out


def test_quick_run_writes_results_json_with_every_part(bench):
    results = json.loads((bench / "results.json").read_text())
    assert results["quick"] is True
    assert set(results["parts"]) == set(PARTS)
    assert not [k for k, v in results["parts"].items() if "error" in v or "plot_error" in v]
    assert {"cores", "torch", "onnxruntime", "loadavg_start", "loadavg_end"} <= set(results["machine"])


def test_quick_run_writes_results_md_with_headline_and_a_section_per_part(bench):
    text = (bench / "RESULTS.md").read_text()
    top = text.split("## Headline")[0]
    assert "QUICK RUN" in top and "MEAN NOTHING" in top              # said before any figure
    for heading in ("## Headline", "## 1. Train recipe", "## 2. Transfer", "## 3. Deploy variants",
                    "## 4. Pipeline overhead", "## 5. Serving", "## Machine"):
        assert heading in text
    headline = text.split("## Headline")[1].split("\n## ")[0]
    for row in ("classic loop / pipeline", "transfer - scratch", "speed-up over PyTorch eager",
                "cached Prefect flow", "server at concurrency 32"):
        assert row in headline
    assert text.count("Command: `python -m benchmarks.run --quick") == 6   # at the top and in each part
    assert "FAILED" not in text and "REPORT ERROR" not in text


def test_quick_run_writes_the_plots(bench):
    for name in ("training", "deploy", "overhead", "serving"):
        assert (bench / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_datasets_table_on_generated_sets(tmp_path):
    """benchmarks.datasets over two generated sets (one with split folders, one without): a row each, the
    baseline beside the pipeline, the CPU named."""
    from benchmarks import datasets
    from stages import machine, prepare, train
    from tests.conftest import COLORS, TINY, make_image
    for k, (c, color) in enumerate(COLORS.items()):
        for i in range(12):
            make_image(tmp_path / "sets" / "flat" / c / f"{i}.png", color, seed=100 * k + i)
            make_image(tmp_path / "sets" / "split" / ("val" if i < 4 else "train") / c / f"{i}.png", color,
                       seed=500 + 100 * k + i)
    rows = datasets.run(tmp_path / "sets", tmp_path / "out", train.Params(**TINY), prepare.Params(source=""))
    assert [r["dataset"] for r in rows] == ["flat", "split"]
    for r in rows:
        assert r["kept"] in ("linear_probe", "finetune") and 0 <= r["baseline_val"] <= 1
        assert r["gap"] == round(r["pipeline_val"] - r["baseline_val"], 4) and r["val"] > 0
    text = (tmp_path / "out" / "DATASETS.md").read_text()
    assert "| flat | 2 |" in text and "Mean gap" in text and machine.cpu()["model"] in text
    assert json.loads((tmp_path / "out" / "datasets.json").read_text())["rows"] == rows


def test_results_md_carries_the_datasets_table_when_there_is_one(bench, tmp_path):
    from benchmarks import report
    out = tmp_path / "out"
    shutil.copytree(bench, out)
    (out / "DATASETS.md").write_text("# The default recipe across data sets (some CPU)\n\n| data set | x |\n")
    report.write(json.loads((out / "results.json").read_text()), out)
    text = (out / "RESULTS.md").read_text()
    section = text.split("## 6. Across data sets")[1]
    assert "| data set | x |" in section and section.index("| data set") < section.index("## Machine")


def test_stability_report_names_every_runs_choice_and_margin_and_its_verdict():
    from benchmarks import stability
    from stages import deploy
    p = deploy.Params(budget={"min_speedup": 1.1})
    same = [("onnx_fp32", {"onnx_fp32": 1.0, "onnx_int8": q}, {"onnx_fp32": "chosen: fallback"}, 60.0)
            for q in (1.02, 1.05, 0.98)]
    text, stable = stability.report(same, p)
    assert stable and "verdict: STABLE" in text and "1.05x (-0.05)" in text and text.count("| onnx_fp32 |") == 3
    flipped = same[:2] + [("onnx_int8", {"onnx_fp32": 1.0, "onnx_int8": 1.12}, {"onnx_int8": "chosen"}, 61.0)]
    text, stable = stability.report(flipped, p)
    assert not stable and "UNSTABLE: the runs shipped onnx_fp32, onnx_int8" in text and "1.12x (+0.02)" in text
