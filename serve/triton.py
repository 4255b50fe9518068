"""triton: the deploy model as a Triton Inference Server model repository, for scale-out serving.

Writes <out>/<model_name>/config.pbtxt (ONNX Runtime backend, dynamic batching, CPU instances), the model as
<out>/<model_name>/1/model.onnx and the class names as labels.txt. Names, types and dims come from the ONNX
graph. Triton does no preprocessing: clients send what `stages.presets.eval_transform` makes (in `parameters`).

The client contract for trust (the graph is the deploy model's, unchanged: it outputs raw `logits` and
`ood_score`, the distance to the k-th nearest train feature, stages/ood.py). The config's `parameters` carry
"trust", the JSON the deploy stage fitted (`stages.trust.Trust`): {"temperature": T, "abstain_below": a,
"ood_above": s, ...}. A client that wants what the HTTP service answers computes, per row: probabilities
softmax(logits / T); "out_of_distribution" if ood_score > s (or is NaN), else "low_confidence" if max probability
< a, else answered. `stages.trust.decide` is that arithmetic in numpy (no torch) and takes
`Trust.from_metadata({"trust": <the parameter's string>})`.
"""
import json
import shutil
from pathlib import Path

from serve.model import Params
from stages import runtime, trust
from stages.config import UserError, atomic_text, atomic_write, cli, load_section, parser, sha256

# serve.max_batch_size 0 (the HTTP service's measured best, a fact of the machine it runs on) leaves Triton's
# dynamic batcher this cap and its preferred sizes to choose from; intra_op_thread_count 0 is ORT's default
MAX_BATCH = 32
TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
         "tensor(int8)": "TYPE_INT8", "tensor(uint8)": "TYPE_UINT8", "tensor(int32)": "TYPE_INT32",
         "tensor(int64)": "TYPE_INT64"}


def tensor(node, label_file=None):
    """One `input`/`output` entry; the batch axis is left out, as Triton adds it when max_batch_size > 0."""
    if node.type not in TYPES:
        raise UserError(f"ONNX tensor {node.name} has type {node.type}, which this writer does not map")
    dims = node.shape[1:]
    if not all(isinstance(d, int) for d in dims):
        raise UserError(f"ONNX tensor {node.name} has shape {node.shape}: only the batch axis may be dynamic")
    label = f'\n    label_filename: "{label_file}"' if label_file else ""
    return f'  {{\n    name: "{node.name}"\n    data_type: {TYPES[node.type]}\n    dims: {list(dims)}{label}\n  }}'


def preferred_sizes(max_batch_size):
    """Powers of two from 4 up to max_batch_size, and max_batch_size itself."""
    sizes = [s for s in (4, 8, 16, 32, 64, 128) if s < max_batch_size]
    return sizes + [max_batch_size]


def config(name, sess, classes, pp, digest, max_batch_size, max_queue_delay_us, instances, threads):
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    fitted = trust.Trust.from_metadata(sess.get_modelmeta().custom_metadata_map)
    params = {"preprocessing": pp.to_json(), "sha256": digest, "intra_op_thread_count": str(threads),
              "trust": fitted.to_json()}
    parameters = "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}'
                           for k, v in params.items())
    ins = ",\n".join(tensor(n) for n in inputs)
    outs = ",\n".join(tensor(n, "labels.txt" if n.shape[-1] == len(classes) else None) for n in outputs)
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
{ins}
]
output [
{outs}
]
dynamic_batching {{
  preferred_batch_size: {preferred_sizes(max_batch_size)}
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
instance_group [
  {{
    count: {instances}
    kind: KIND_CPU
  }}
]
{parameters}
"""


def run(onnx_path, out_dir, max_batch_size, max_queue_delay_us=5000, instances=1, threads=2, model_name="classifier"):
    """Write the repository for `onnx_path` under `out_dir`; returns the config.pbtxt text."""
    if max_batch_size < 1:
        raise UserError(f"max_batch_size must be >= 1 for dynamic batching, not {max_batch_size}")
    sess = runtime.session(onnx_path)
    classes, pp = runtime.metadata(sess)
    text = config(model_name, sess, classes, pp, sha256(onnx_path), max_batch_size, max_queue_delay_us,
                  instances, threads)
    model_dir = Path(out_dir) / model_name
    atomic_write(model_dir / "1" / "model.onnx", lambda tmp: shutil.copyfile(onnx_path, tmp))
    atomic_text(model_dir / "labels.txt", "".join(f"{c}\n" for c in classes))
    atomic_text(model_dir / "config.pbtxt", text)
    return text


def main():
    ap = parser(__doc__, "--onnx", "--out")
    ap.add_argument("--model-name", default="classifier")
    args = ap.parse_args()
    p = load_section(Params, "serve")              # the service's batching settings, one source of truth
    batch = p.max_batch_size or MAX_BATCH
    run(args.onnx, args.out, batch, round(p.max_wait_ms * 1000), threads=p.threads, model_name=args.model_name)
    print(f"triton: model repository in {args.out}/{args.model_name} (max_batch_size {batch})")


if __name__ == "__main__":
    cli(main)
