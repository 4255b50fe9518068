"""The benchmark harness end to end with --quick: every part runs and is reported. No figure is asserted."""
import json
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
