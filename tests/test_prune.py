import json

import pytest
import torch
import torch_pruning as tp

from stages import backbones, export, presets, prune, runtime, train
from stages.checkpoint import load_model, rebuild, widths
from stages.config import UserError
from stages.manifest import read_manifest


def test_pruning_shrinks_the_model_which_reloads_safely_and_exports_with_parity(tmp_path, manifest, checkpoint):
    report = prune.run(checkpoint, manifest, tmp_path / "p", prune.Params(ratio=0.5, scope="all", epochs=1))
    assert report["params_after"] < 0.5 * report["params_before"]     # half the channels: ~1/4 of the weights
    assert report["macs_after"] < 0.5 * report["macs_before"]
    assert all(0 <= report[f"holdout_acc_{k}"] <= 1 for k in ("before", "pruned", "recalibrated", "recovered"))
    assert [h["phase"] for h in report["recovery"]] == ["linear_probe", "finetune"]
    assert json.loads((tmp_path / "p" / "report.json").read_text()) == report

    ckpt = torch.load(tmp_path / "p" / "model.pt", weights_only=True)   # no pickled code in it
    assert set(torch.load(checkpoint, weights_only=True)) | {"pruning"} == set(ckpt)
    model, classes, pp = load_model(tmp_path / "p" / "model.pt")
    assert classes == ["blue", "red"]
    x = torch.zeros(1, 3, pp.input_size, pp.input_size)
    assert tp.utils.count_ops_and_params(model, x) == (report["macs_after"], report["params_after"])
    fresh = backbones.create(ckpt["backbone"], "none", 2, ckpt["dropout"])[0]
    with pytest.raises(RuntimeError, match="size mismatch"):            # the unpruned network cannot hold it...
        fresh.load_state_dict(ckpt["model"])
    unpruned, _, _ = load_model(checkpoint)                             # ...the one loader reads both
    assert sum(p.numel() for p in unpruned.parameters()) == report["params_before"]

    rows, _ = read_manifest(manifest, {"val"})
    batches = train.loader(rows, classes, presets.eval_transform(pp), 8)
    export.to_onnx(model, classes, pp, tmp_path / "pruned.onnx")
    result = export.parity(train.predict(model, batches, "cpu")[0],
                           export.predict_onnx(runtime.session(tmp_path / "pruned.onnx"), batches)[0])
    assert result["top1_agreement"] == 1.0 and result["max_abs_logit_diff"] < 1e-3


def test_rebuild_restores_the_exact_pruned_network():
    torch.manual_seed(0)
    model, pp = backbones.create("test_efficientnet", "none", 3)
    prune.prune(model, pp.input_size, prune.Params(ratio=0.3, importance="lamp"))
    fresh, _ = backbones.create("test_efficientnet", "none", 3)
    width = fresh.head[1].in_features
    rebuild(fresh, model.state_dict(), widths(model))
    x = torch.randn(2, 3, pp.input_size, pp.input_size)
    assert torch.equal(model.eval()(x), fresh.eval()(x))
    assert fresh.head[1].in_features == model.head[1].in_features < width  # the classifier's input shrank too
    assert fresh.head[1].out_features == 3                                # its outputs never


def test_hidden_scope_keeps_the_residual_streams_whole():
    model, pp = backbones.create("test_efficientnet", "none", 2)
    before = widths(model)
    streams = {id(m) for m in prune.stream_layers(model)}
    names = {n for n, m in model.named_modules() if id(m) in streams}
    assert len(names) >= 3
    (macs0, params0), (macs1, params1) = prune.prune(model, pp.input_size, prune.Params(ratio=0.5, round_to=0))
    after = widths(model)
    assert all(after[n]["out_channels"] == before[n]["out_channels"] for n in names)     # streams untouched
    hidden = [n for n in names if n.endswith("conv_pwl")]               # inverted and edge residuals
    assert hidden and all(after[n]["in_channels"] < before[n]["in_channels"] for n in hidden)  # expansions cut
    assert params1 < params0 and macs1 < macs0
    x = torch.randn(2, 3, pp.input_size, pp.input_size)
    assert model.eval()(x).shape == (2, 2)


def test_hidden_scope_names_the_fix_for_unknown_architectures():
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten())
    model = backbones.Classifier(body, 8, 2, 0.0)
    with pytest.raises(UserError, match="prune.scope: all"):
        prune.prune(model, 32, prune.Params())


def test_recalibrated_batchnorm_holds_the_statistics_of_the_data():
    torch.manual_seed(0)
    model, pp = backbones.create("test_efficientnet", "none", 2)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    bn.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    data = [(torch.randn(4, 3, 64, 64) * 3 + 1, torch.zeros(4)) for _ in range(3)]
    prune.recalibrate_bn(model, data, "cpu")
    x = torch.cat(seen)
    assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-4)
    assert bn.momentum == 0.1 and not model.training


@pytest.mark.parametrize("bad, match", [(dict(ratio=1.0), "ratio"), (dict(importance="taylor"), "importance"),
                                        (dict(scope="streams"), "scope")])
def test_bad_params_fail_with_the_fix(bad, match):
    with pytest.raises(UserError, match=match):
        prune.Params(**bad)
