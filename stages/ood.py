"""The out-of-distribution score inside the shipped ONNX file: how far an image's features lie from train's.

The score is pytorch_ood's `KNN` (Sun et al. 2022, "Out-of-distribution detection with deep nearest
neighbors"): the Euclidean distance of the L2-normalised body features to the k-th nearest of a bank of
L2-normalised train features. The deploy stage builds the bank through the file it ships (an INT8 file's
features are its own) and appends the search to that file's graph as a second output, `ood_score` (batch, 1),
so the server, batch prediction and Triton get it from the one ONNX Runtime call they already make, with no
torch and no index to ship beside the model. pytorch_ood fits and searches with scikit-learn at build and
evaluation time (the tests compare the two); no maintained library turns a fitted neighbour index into ONNX
operators, hence the few nodes written here.

Why not the energy score alone: with two classes a softmax head's logits sum to a constant, so energy ranks
inputs as the top probability does (see stages/trust.py) and adds nothing to abstention; a noise image the head
happens to find bee-like passes both. Distance in feature space sees that it is like no train image.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from stages.runtime import FEATURES, OOD


def with_knn(model, bank, k):
    """A copy of the ONNX `model` (whose graph outputs `FEATURES`) with the output `OOD` added and `FEATURES`
    removed: the k-th nearest neighbour distance of each row's normalised features to the rows of `bank`
    (n, dim), normalised here. Only operators whose signature has not changed since opset 10 (no Reduce*,
    whose axes moved from attribute to input at opset 18), so it fits the graph of any variant, INT8 included."""
    g = onnx.ModelProto()
    g.CopyFrom(model)
    graph = g.graph
    if FEATURES not in [o.name for o in graph.output]:
        raise ValueError(f"the model has no {FEATURES!r} output (made by stages.export.to_onnx)")
    bank = np.asarray(bank, np.float32)
    if not 1 <= k <= len(bank):
        raise ValueError(f"k={k} needs a bank of at least k rows, not {len(bank)}")
    unit = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    consts = {"ood_bank_t": unit.T.copy(), "ood_ones": np.ones((bank.shape[1], 1), np.float32),
              "ood_eps": np.float32(1e-12), "ood_one": np.float32(1.0), "ood_two": np.float32(2.0),
              "ood_zero": np.float32(0.0), "ood_k": np.array([k], np.int64), "ood_start": np.array([k - 1], np.int64),
              "ood_end": np.array([k], np.int64), "ood_axis": np.array([1], np.int64)}
    graph.initializer.extend(numpy_helper.from_array(v, n) for n, v in consts.items())
    n = helper.make_node
    graph.node.extend([
        # z = f / max(|f|, 1e-12), as pytorch_ood's KNN._prepare: a zero vector stays finite
        n("Mul", [FEATURES, FEATURES], ["ood_sq"]),
        n("MatMul", ["ood_sq", "ood_ones"], ["ood_norm2"]),           # (batch, 1)
        n("Sqrt", ["ood_norm2"], ["ood_norm"]),
        n("Max", ["ood_norm", "ood_eps"], ["ood_norm_c"]),
        n("Div", [FEATURES, "ood_norm_c"], ["ood_z"]),
        n("Mul", ["ood_z", "ood_z"], ["ood_zsq"]),
        n("MatMul", ["ood_zsq", "ood_ones"], ["ood_zz"]),              # |z|^2: 1, or 0 for a zero vector
        n("MatMul", ["ood_z", "ood_bank_t"], ["ood_sim"]),             # z . b for every bank row b
        n("TopK", ["ood_sim", "ood_k"], ["ood_top", "ood_top_i"], axis=1, largest=1, sorted=1),
        n("Slice", ["ood_top", "ood_start", "ood_end", "ood_axis"], ["ood_kth"]),   # k-th largest, (batch, 1)
        # |z - b|^2 = |z|^2 + |b|^2 - 2 z.b, |b| = 1; floored at 0 against rounding before the root
        n("Mul", ["ood_kth", "ood_two"], ["ood_2s"]),
        n("Add", ["ood_zz", "ood_one"], ["ood_zz1"]),
        n("Sub", ["ood_zz1", "ood_2s"], ["ood_d2"]),
        n("Max", ["ood_d2", "ood_zero"], ["ood_d2c"]),
        n("Sqrt", ["ood_d2c"], [OOD]),
    ])
    batch = next(o for o in graph.output if o.name == FEATURES).type.tensor_type.shape.dim[0]
    keep = [o for o in graph.output if o.name != FEATURES]
    del graph.output[:]
    graph.output.extend(keep)
    out = helper.make_tensor_value_info(OOD, TensorProto.FLOAT, [None, 1])
    out.type.tensor_type.shape.dim[0].CopyFrom(batch)             # the same dynamic batch axis as the input's
    graph.output.append(out)
    onnx.checker.check_model(g)
    return g


def knn_scores(bank, features, k):
    """pytorch_ood's KNN scores of `features` against the `bank` (numpy, float64): what `with_knn` computes in
    the graph, for the trust stage's analyses and the tests."""
    import torch
    from pytorch_ood.detector import KNN

    bank, features = torch.as_tensor(np.asarray(bank, np.float32)), torch.as_tensor(np.asarray(features, np.float32))
    return KNN(None, k=k).fit_features(bank, torch.zeros(len(bank), dtype=torch.long)).predict_features(
        features).numpy()
