import json

import numpy as np
import onnx
import pytest

from stages import export, runtime
from stages.config import UserError


def test_export_checks_parity_and_carries_metadata(tmp_path, manifest, checkpoint):
    result = export.run(checkpoint, manifest, tmp_path / "e", export.Params())
    assert result["top1_agreement"] == 1.0 and result["max_abs_logit_diff"] <= 1e-3 and result["images"] == 8
    assert json.loads((tmp_path / "e" / "parity.json").read_text()) == result
    path = tmp_path / "e" / "model.onnx"
    onnx.checker.check_model(onnx.load(str(path)))
    assert not list((tmp_path / "e").glob("*.data"))                     # one self-contained file
    sess = runtime.session(path)
    classes, pp = runtime.metadata(sess)
    assert classes == ["blue", "red"] and pp.input_size > 0
    for batch in (1, 5):                                                  # dynamic batch axis
        x = np.zeros((batch, 3, pp.input_size, pp.input_size), np.float32)
        assert sess.run(None, {runtime.INPUT: x})[0].shape == (batch, 2)

    run = runtime.Runner(path, threads=1)                                  # batch-1 session + dynamic one
    assert run.single.get_inputs()[0].shape[0] == 1 and run.sess.get_inputs()[0].shape[0] == runtime.BATCH
    x = np.random.default_rng(0).normal(size=(3, 3, pp.input_size, pp.input_size)).astype(np.float32)
    whole = run(x)
    assert whole.shape == (3, 2)
    for i in range(3):
        np.testing.assert_allclose(run(x[i:i + 1]), whole[i:i + 1], atol=1e-5)
    single = runtime.Runner(path, threads=1, dynamic=False)                # one image a call: one session
    assert single.sess is None
    np.testing.assert_allclose(single(x[:1]), whole[:1], atol=1e-5)
    with pytest.raises(ValueError, match="a batch of 3 on a runner made for single images"):
        single(x)


def test_a_model_outside_tolerance_is_not_written(tmp_path, manifest, checkpoint):
    with pytest.raises(UserError, match="disagrees with PyTorch"):
        export.run(checkpoint, manifest, tmp_path / "e", export.Params(max_logit_diff=-1.0))
    assert not (tmp_path / "e").exists() or not list((tmp_path / "e").iterdir())
