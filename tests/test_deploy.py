import csv
import dataclasses
import hashlib
import json
import multiprocessing
import subprocess
import sys

import numpy as np
import onnx
import pytest

from stages import candidates, deploy, export, machine, presets, prune, quantize, runtime, throughput, trust
from stages.config import UserError
from stages.manifest import read_manifest
from stages.train import loader

BUDGET = deploy.Budget(max_accuracy_drop=0.005, min_agreement=0.99, min_speedup=1.1)


def table(**int8):
    """PyTorch 0.90 accurate at 40 ms, ONNX FP32 identical at 10 ms, plus `int8` variants."""
    return {"pytorch_fp32": dict(accuracy=0.90, agreement=1.0, latency_ms_p50=40.0),
            "onnx_fp32": dict(accuracy=0.90, agreement=1.0, latency_ms_p50=10.0), **int8}


def test_a_faster_variant_within_budget_is_chosen():
    chosen, why = deploy.select(table(onnx_int8=dict(accuracy=0.899, agreement=0.995, latency_ms_p50=6.0),
                                      pruned_int8=dict(accuracy=0.90, agreement=0.99, latency_ms_p50=4.0)), BUDGET)
    assert chosen == "pruned_int8"
    assert why[chosen] == "chosen: fastest within budget, 10.00x pytorch_fp32 at batch 1"
    assert why["onnx_int8"] == "within budget, slower than pruned_int8"
    assert why["onnx_fp32"] == "within budget, slower than pruned_int8"


@pytest.mark.parametrize("int8, reason", [
    (dict(accuracy=0.90, agreement=0.97, latency_ms_p50=5.0), "over budget: agreement 0.9700 < 0.99"),
    (dict(accuracy=0.89, agreement=0.99, latency_ms_p50=5.0), "over budget: accuracy drop 0.0100 > 0.005"),
    (dict(accuracy=0.90, agreement=1.0, latency_ms_p50=9.8),
     "not faster: 1.02x onnx_fp32 at batch 1 (needs 1.1x)"),
])
def test_int8_over_budget_or_not_faster_falls_back_to_onnx_fp32(int8, reason):
    chosen, why = deploy.select(table(onnx_int8=int8), dataclasses.asdict(BUDGET))   # a plain dict works too
    assert chosen == "onnx_fp32" and why["onnx_fp32"] == "chosen: fallback, no faster variant within budget"
    assert why["onnx_int8"] == reason and why["pytorch_fp32"].startswith("baseline")


def test_a_speed_up_seen_in_only_some_paired_rounds_does_not_replace_onnx_fp32():
    """The median says 1.25x; the lower quartile of the per-round ratios says 1.0x: noise, not a speed-up."""
    rounds = dict(latency_ms_rounds=[8.0] * 5 + [10.0] * 3)
    t = table(onnx_int8=dict(accuracy=0.90, agreement=1.0, latency_ms_p50=8.0, **rounds))
    t["onnx_fp32"]["latency_ms_rounds"] = [10.0] * 8
    chosen, why = deploy.select(t, BUDGET)
    assert chosen == "onnx_fp32"
    assert why["onnx_int8"] == "not faster: 1.00x onnx_fp32 at batch 1, lower quartile of 8 paired rounds (needs 1.1x)"
    t["onnx_int8"]["latency_ms_rounds"] = [8.0] * 7 + [10.0]        # slower in one round of eight: it ships
    assert deploy.select(t, BUDGET)[0] == "onnx_int8"


def test_no_fallback_within_budget_is_an_error():
    with pytest.raises(UserError, match="even onnx_fp32 misses the budget"):
        deploy.select(table(), dataclasses.replace(BUDGET, min_agreement=1.01))


def test_calibration_sample_is_stratified_deterministic_and_named_by_its_hashes():
    rows = [{"label": c, "sha256": f"{c}{i:03d}"} for c, n in (("a", 30), ("b", 6)) for i in range(n)]
    picked = quantize.calibration_rows(rows, 10, seed=0)
    assert [r["label"] for r in picked[:12]].count("b") == 5 and len(picked) == 10      # round-robin by class
    assert picked == quantize.calibration_rows(list(reversed(rows)), 10, seed=0)        # row order does not matter
    assert quantize.calibration_rows(rows, 4) == picked[:4]                            # a smaller set is a prefix
    assert quantize.digest(picked) != quantize.digest(quantize.calibration_rows(rows, 10, seed=1))
    assert quantize.digest(picked) == hashlib.sha256("\n".join(r["sha256"] for r in picked).encode()).hexdigest()


@pytest.mark.parametrize("layers, match", [([{"per_chanel": True}], "per_chanel"),
                                           ([{}, {"calibrate_method": "KL"}], "calibrate_method")])
def test_bad_int8_settings_fail_with_the_fix(layers, match):
    with pytest.raises(UserError, match=match):
        quantize.settings(*layers)


FAST = dict(rounds=1, repeats=3, batch_repeats=1, warmup=1, batch_size=8, int8={"calibration_size": 8},
            tries=({}, {"calibrate_method": "Percentile", "per_channel": False}), exclude_worst=2,
            serving={"seconds": 0.1, "rounds": 1, "batches": [1, 4]})


def test_deploy_writes_a_verified_card_and_the_variant_table(tmp_path, manifest, checkpoint):
    onnx_path = tmp_path / "export" / "model.onnx"
    export.run(checkpoint, manifest, tmp_path / "export", export.Params(max_logit_diff=1e-3))
    prune.run(checkpoint, manifest, tmp_path / "prune", prune.Params(ratio=0.5, epochs=0))
    out = tmp_path / "deploy"
    p = deploy.Params(**FAST, budget=dict(min_speedup=1000.0))       # nothing is that much faster: the fallback
    card, variants, report = deploy.run(checkpoint, onnx_path, tmp_path / "prune" / "model.pt", manifest, out, p)

    assert card["variant"] == "onnx_fp32" and card["calibration_sha256"] is None
    assert json.loads((out / "card.json").read_text()) == card
    assert card["sha256"] == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    assert card["model"] == (out / "model.onnx").as_posix() and card["git_rev"]
    meta = {e.key: e.value for e in onnx.load(str(out / "model.onnx")).metadata_props}
    assert meta["variant"] == "onnx_fp32" and json.loads(meta["classes"]) == card["classes"] == ["blue", "red"]
    assert json.loads(meta["params"])["deploy"]["budget"]["min_speedup"] == 1000.0 and meta["opset"] == "17"
    assert runtime.metadata(runtime.session(out / "model.onnx"))[0] == ["blue", "red"]   # what the server reads
    assert not {"git_rev", "metrics", "reason", "sha256", "built_on", "serving"} & set(meta)   # run, host: card only
    serving = card["serving"]                                # the server's defaults, measured on the chosen file
    assert serving["cores"] == throughput.cores() and serving["images"] == len(read_manifest(manifest, {"val"})[0])
    assert [(s["batch"], s["lanes"] * s["threads"]) for s in serving["settings"]] == \
        [(b, serving["cores"]) for b in (1, 4) for _ in throughput.splits(serving["cores"])]
    assert serving["best"] == max(serving["settings"], key=lambda s: s["img_s"]) and serving["best"]["img_s"] > 0
    assert card["built_on"] == machine.cpu() and card["built_on"]["cores"] >= 1
    fitted = trust.Trust.from_metadata(runtime.session(out / "model.onnx").get_modelmeta().custom_metadata_map)
    assert json.loads(meta["trust"]) == card["trust"] and fitted.temperature == card["trust"]["temperature"] > 0
    assert card["trust"]["fit"]["images"] > 0 and card["trust"]["fit"]["target_accuracy"] == 0.99
    # the shipped file answers the OOD score itself; export's FEATURES output is gone from it
    assert [o.name for o in runtime.session(out / "model.onnx").get_outputs()] == [runtime.OUTPUT, runtime.OOD]
    assert np.isfinite(fitted.ood_above) and card["trust"]["fit"]["ood_bank_images"] == len(
        read_manifest(manifest, {"train"})[0])
    for d, facts in (("w1", {}), ("w2", {"git_rev": "f" * 40, "reason": "chosen, 9.9x", "metrics": {"x": 1}})):
        deploy.write(tmp_path / d, onnx_path, out / "onnx_int8.onnx", {**card, **facts}, variants,
                     report["reasons"], report)
    assert (tmp_path / "w1/model.onnx").read_bytes() == (tmp_path / "w2/model.onnx").read_bytes()
    # export's INT8, kept for the trust stage though FP32 ships: INT8 operators, export's outputs
    int8 = onnx.load(str(out / "onnx_int8.onnx"))
    assert "QuantizeLinear" in {n.op_type for n in int8.graph.node}
    assert [o.name for o in int8.graph.output] == [o.name for o in onnx.load(str(onnx_path)).graph.output]

    names = ["pytorch_fp32", "onnx_fp32", "onnx_int8", "pruned_fp32", "pruned_int8"]
    assert json.loads((out / "variants.json").read_text()) == variants and sorted(variants) == sorted(names)
    assert [r["variant"] for r in csv.DictReader(open(out / "variants.csv"))] == list(variants)
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    for n, v in variants.items():
        assert 0 < v["latency_ms_min"] <= v["latency_ms_p50"] <= v["latency_ms_p99"] <= v["latency_ms_max"]
        assert v["throughput_b8"] > 0 and v["latency_ms_p50_after_batch"] > 0 and v["chosen"] == (n == "onnx_fp32")
        assert report["reasons"][n].startswith(("baseline", "chosen", "over budget", "not faster"))
    assert not multiprocessing.active_children()           # the timing processes, one per variant, are gone
    assert variants["onnx_fp32"]["agreement"] == 1.0 and variants["onnx_fp32"]["max_logit_diff"] < 1e-3
    assert variants["onnx_int8"]["size_mb"] < variants["onnx_fp32"]["size_mb"]
    size = {n: v["size_mb"] for n, v in variants.items()}
    assert size["pruned_int8"] < size["pruned_fp32"] < size["onnx_fp32"]
    assert all(len(v["latency_ms_rounds"]) == 2 * p.rounds for v in variants.values())   # both batch-1 passes
    assert card["metrics"]["speedup_fp32_q1"] == 1.0 and card["metrics"]["speedup_margin"] is None  # the fallback
    plain = {n: {k: v[k] for k in ("accuracy", "agreement", "latency_ms_p50", "latency_ms_rounds")}
             for n, v in variants.items()}
    assert deploy.select(plain, p.budget) == ("onnx_fp32", report["reasons"])

    train_rows, classes = read_manifest(manifest, {"train"})
    calibration = quantize.calibration_rows(train_rows, 8)
    for rec in report["int8"].values():
        assert rec["tries"][0]["calibration_sha256"] == quantize.digest(calibration)
        assert rec["tries"][0]["settings"]["calibrate_method"] == "MinMax"
        assert 0 <= rec["val_agreement_with_source"] <= 1

    # INT8 on its own, on a fixed batch: smaller, metadata kept, and close to FP32. The tiny model is nearly
    # untrained, so its logits crowd together: allow one flip in 8 and an error of a tenth of the logit range.
    tf = presets.eval_transform(runtime.metadata(runtime.session(onnx_path))[1])
    x = next(iter(loader(calibration, classes, tf, 8)))[0].numpy()
    val_rows, _ = read_manifest(manifest, {"val"})
    v = next(iter(loader(val_rows, classes, tf, 8)))[0].numpy()
    quantize.quantize(onnx_path, tmp_path / "int8.onnx", [x], quantize.Settings(calibration_size=8))
    assert (tmp_path / "int8.onnx").stat().st_size < onnx_path.stat().st_size
    fp32, int8 = (runtime.session(f).run(None, {runtime.INPUT: v})[0] for f in (onnx_path, tmp_path / "int8.onnx"))
    assert runtime.metadata(runtime.session(tmp_path / "int8.onnx"))[0] == classes
    assert (fp32.argmax(1) == int8.argmax(1)).mean() >= 7 / 8
    assert np.abs(fp32 - int8).max() <= 0.1 * (fp32.max() - fp32.min())

    # An agreement no INT8 model can reach: every try fails, the module scopes that break it are found by
    # leaving each in FP32 in turn, and the worst two stay FP32 in one last try.
    hold = list(loader(read_manifest(manifest, {"holdout"})[0], classes, tf, 8))
    strict = deploy.Params(**{**FAST, "budget": dict(min_agreement=1.01)})
    cal_x = next(iter(loader(calibration, classes, tf, 8)))[0].numpy()
    path, rec = quantize.search("q", onnx_path, tmp_path, calibration, cal_x, hold, strict)
    worst = rec["diagnosis"]["worst"]
    assert len(rec["tries"]) == len(FAST["tries"]) + 1 and 2 <= len(worst) <= 5
    assert [w["gain_db"] for w in worst] == sorted((w["gain_db"] for w in worst), reverse=True)
    assert all(w["scope"].startswith("/") and w["nodes"] > 0 for w in worst)
    excluded = rec["tries"][-1]["settings"]["nodes_to_exclude"]
    assert list(excluded) == rec["diagnosis"]["exclude"] and len(excluded) == sum(w["nodes"] for w in worst[:2])
    last = onnx.load(str(tmp_path / f"q-try{len(FAST['tries'])}.onnx"))
    dequantized = {o for n in last.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert {n.name for n in last.graph.node} >= set(excluded)
    for node in (n for n in last.graph.node if n.name in excluded and n.op_type == "Conv"):
        assert node.input[1] not in dequantized                              # its weights stayed FP32


def test_a_lower_test_size_is_a_variant_whose_size_travels_in_its_file(tmp_path, manifest, checkpoint):
    """`deploy.sizes`: export's weights again at 128 px (the tiny backbone's own is 160), and its INT8 calibrated
    at 128; scored and timed at that size; once shipped, the file's metadata and input say 128, which is what
    the server, batch prediction and the trust stage read."""
    from stages import trust_fit
    from stages.checkpoint import load_checkpoint, load_model

    export.run(checkpoint, manifest, tmp_path / "export", export.Params(max_logit_diff=1e-3))
    p = deploy.Params(**{**FAST, "tries": ({},), "exclude_worst": 0}, sizes=(128,))
    (hold, _), (train_rows, _), (val, _) = (read_manifest(manifest, {s}) for s in ("holdout", "train", "val"))
    cal = quantize.calibration_rows(train_rows, 8)
    files, int8 = candidates.variants(checkpoint, tmp_path / "export" / "model.onnx", None, tmp_path, cal, hold, p)
    assert sorted(files) == ["onnx_fp32", "onnx_fp32_128", "onnx_int8", "onnx_int8_128", "pytorch_fp32"]
    size = {n: runtime.metadata(runtime.session(f))[1].input_size for n, f in files.items() if n != "pytorch_fp32"}
    assert size == {"onnx_fp32": 160, "onnx_int8": 160, "onnx_fp32_128": 128, "onnx_int8_128": 128}
    assert int8["onnx_int8_128"]["tries"][0]["holdout_images"] == len(hold)
    model, classes, pp = load_model(checkpoint)
    table, _ = candidates.measure(model, classes, pp, files, val, p)
    assert {n: v["input_size"] for n, v in table.items()} == {**size, "pytorch_fp32": 160}
    assert all(v["latency_ms_p50"] > 0 and 0 <= v["accuracy"] <= 1 for v in table.values())
    shipped, fitted, fit = trust_fit.trusted(model, load_checkpoint(checkpoint), "onnx_fp32_128",
                                             files["onnx_fp32_128"], train_rows, hold, tmp_path / "shipped.onnx", p)
    sess = runtime.session(shipped)
    assert runtime.metadata(sess)[1] == pp.at_size(128) and sess.get_inputs()[0].shape[2:] == [128, 128]
    assert fit["images"] > 0 and np.isfinite(fitted.ood_above)


@pytest.mark.slow
def test_recheck_on_the_building_machine_agrees_with_the_shipped_choice(clone):
    """`make recheck` rebuilds and re-times the variants from the deploy stage's own command in dvc.yaml, says
    the shipped choice holds here, and leaves the pipeline's outputs as they were."""
    outputs = clone / "outputs/deploy"
    before = {f.name: f.read_bytes() for f in outputs.iterdir()}
    r = subprocess.run([sys.executable, "-m", "stages.recheck"], cwd=clone, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    shipped = json.loads(before["card.json"])["variant"]
    assert f"shipped {shipped}; here {shipped} (" in r.stdout and "holds on this machine" in r.stdout
    assert f"built on {machine.describe()}; here {machine.describe()}" in r.stdout
    assert {f.name: f.read_bytes() for f in outputs.iterdir()} == before
