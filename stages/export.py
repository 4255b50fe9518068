"""export: the trained checkpoint as one ONNX file with a dynamic batch axis, checked against PyTorch.

The ONNX metadata carries class names, preprocessing, backbone and params, so the file alone is enough to
serve. Parity is measured on the real val images: top-1 agreement and the largest absolute logit difference.
"""
import dataclasses
import json
from pathlib import Path

import onnx
import torch

from stages import presets
from stages.checkpoint import load_checkpoint, load_model
from stages.config import UserError, atomic_text, atomic_write, cli, load_section, parser
from stages.loading import loader, predict
from stages.manifest import read_manifest
from stages.runtime import BATCH, FEATURES, INPUT, OUTPUT, session

OPSET = 17


@dataclasses.dataclass(frozen=True)
class Params:
    min_agreement: float = 1.0      # top-1 agreement with PyTorch on val, fraction
    max_logit_diff: float = 1e-3    # largest absolute logit difference on val
    batch_size: int = 32


class WithFeatures(torch.nn.Module):
    """A `Classifier` that also returns its head's input: the features the deploy stage's out-of-distribution
    score searches (stages/ood.py); INT8 quantization keeps graph outputs, so every variant has them."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        f = self.model.body(x)
        return self.model.head(f), f


def to_onnx(model, classes, pp, path, extra=None):
    """Write `model` to `path` with outputs OUTPUT (logits) and FEATURES (legacy TorchScript exporter: one
    file, ~10x faster than dynamo here)."""
    x = torch.zeros(2, 3, pp.input_size, pp.input_size)
    torch.onnx.export(WithFeatures(model.eval()).eval(), (x,), str(path), dynamo=False, opset_version=OPSET,
                      input_names=[INPUT], output_names=[OUTPUT, FEATURES],
                      dynamic_axes={INPUT: {0: BATCH}, OUTPUT: {0: BATCH}, FEATURES: {0: BATCH}})
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    for k, v in {"classes": json.dumps(classes), "preprocessing": pp.to_json(), **(extra or {})}.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))


def predict_onnx(sess, batches):
    """Logits and labels over `batches`, in order, as torch tensors."""
    out, labels = [], []
    for x, y in batches:
        out.append(torch.from_numpy(sess.run(None, {INPUT: x.numpy()})[0]))
        labels.append(y)
    return torch.cat(out), torch.cat(labels)


def parity(a, b):
    return {"top1_agreement": round((a.argmax(1) == b.argmax(1)).float().mean().item(), 6),
            "max_abs_logit_diff": float((a - b).abs().max()), "images": len(a)}


def run(checkpoint, manifest, out_dir, p):
    """Export, check, and measure parity on val; a model outside the tolerances is never written."""
    ckpt = load_checkpoint(checkpoint)
    (model, classes, pp), params = load_model(ckpt), ckpt["params"]
    rows, _ = read_manifest(manifest, {"val"})
    batches = loader(rows, classes, presets.eval_transform(pp), p.batch_size)
    torch_logits, _ = predict(model, batches, "cpu", "export: parity")
    result = {}

    def write(tmp):
        to_onnx(model, classes, pp, tmp, {"backbone": params["backbone"], "params": json.dumps(params)})
        result.update(parity(torch_logits, predict_onnx(session(tmp), batches)[0]))
        if result["top1_agreement"] < p.min_agreement or result["max_abs_logit_diff"] > p.max_logit_diff:
            raise UserError(f"ONNX model disagrees with PyTorch on val: {result} (limits: agreement >= "
                            f"{p.min_agreement}, max logit diff <= {p.max_logit_diff}); not written")

    atomic_write(Path(out_dir) / "model.onnx", write)
    atomic_text(Path(out_dir) / "parity.json", json.dumps(result, indent=2) + "\n")
    return result


def main():
    args = parser(__doc__, "--checkpoint", "--manifest", "--out").parse_args()
    result = run(args.checkpoint, args.manifest, args.out, load_section(Params, "export"))
    print(f"export: top-1 agreement {result['top1_agreement']:.4f}, "
          f"max |logit diff| {result['max_abs_logit_diff']:.2e} on {result['images']} val images")


if __name__ == "__main__":
    cli(main)
