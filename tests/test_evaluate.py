import csv
import json

import torch

from stages import evaluate, export, scores


def test_scores_on_a_known_case():
    m = scores.scores(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 1]), ["a", "b"])
    assert m["accuracy"] == 0.75 and m["confusion"] == [[1, 1], [0, 2]]
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2}
    assert m["per_class"]["b"]["precision"] == 0.6667 and m["per_class"]["b"]["recall"] == 1.0
    assert m["macro_f1"] == round((0.6667 + 0.8) / 2, 4)


def test_evaluate_scores_both_models(tmp_path, manifest, checkpoint):
    export.run(checkpoint, manifest, tmp_path / "e", export.Params())
    metrics, text = evaluate.run(checkpoint, tmp_path / "e" / "model.onnx", manifest, tmp_path / "v",
                                 evaluate.Params())
    assert metrics["val_images"] == 8 and metrics["onnx_agreement"] == 1.0
    assert metrics["pytorch"]["accuracy"] == metrics["onnx"]["accuracy"] >= 0.75
    assert json.loads((tmp_path / "v" / "metrics.json").read_text()) == metrics
    rows = list(csv.DictReader(open(tmp_path / "v" / "predictions.csv")))
    assert len(rows) == 8 and {r["actual"] for r in rows} == {"red", "blue"}
    acc = sum(r["actual"] == r["predicted"] for r in rows) / len(rows)
    assert round(acc, 4) == metrics["pytorch"]["accuracy"]
    assert (tmp_path / "v" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "accuracy  PyTorch" in text and (tmp_path / "v" / "summary.txt").read_text() == text
    # the frozen-feature baseline beside the shipped model, and which of the two train kept and why
    kept = metrics["selection"]["kept"]
    assert kept in ("linear_probe", "finetune") and 0 <= metrics["baseline"]["accuracy"] <= 1
    assert metrics["gap_to_baseline"] == round(metrics["pytorch"]["accuracy"] - metrics["baseline"]["accuracy"], 4)
    if kept == "linear_probe":
        assert metrics["gap_to_baseline"] == 0
    assert "baseline  frozen-feature logistic regression" in text and f"kept      {kept}: " in text
