"""batch: the deploy model over every file under a folder or URI, on Ray Data, into Parquet (or CSV), resumably.

The driver checks the card (SHA-256) and lists the files (pyarrow.fs: a local folder, s3://, gs://, hdfs://, or
any fsspec URI whose package is installed); a pool of Ray actors reads, opens, decodes and preprocesses them with
the server's own code and limits (serve.model.preprocess with the card's transform) and runs ONNX Runtime (where
the cluster has GPUs and onnxruntime-gpu is installed: Ray tasks decode on the CPUs and the actors run CUDA); the
driver writes the results in parts of `batch_part_rows` rows, each part atomically. A run killed at any point
leaves only whole parts; a re-run with the same model reads them and scores only the files they lack. A file that
is not a usable image lands in the errors table with the server's reason, and the job goes on.

OUT, a folder: predictions/part-NNNNN.parquet (path, top1, probability, top_k_classes, top_k_probabilities,
abstained, reason, model_sha256; probabilities calibrated and abstentions decided as the server does) and
errors/part-NNNNN.parquet (path, kind, error, model_sha256); paths are relative to the root listed. OUT ending
in .csv: the parts live in OUT.parts/ and OUT is predict_folder's CSV (path, top1, probability, top_k,
abstained, reason, error) plus model_sha256, sorted by path.
"""
import queue
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from serve.model import InputError, Model, Params, policy, preprocess, top_k
from serve.parts import SCHEMA, finished, part_files, write_csv, write_part
from stages import throughput
from stages.card import write_card
from stages.config import UserError, cli, load_section, parser

# calls at once in one actor at most: the server shows one process keeping 2 cores busy with ONNX Runtime beside
# Python's decode and bookkeeping (its GIL shared); how far that goes on bigger machines is not measured here, so
# their lanes go to more actors, each a worker process that imports Ray Data and loads the model once a job
LANES_PER_ACTOR = 4
ROWS = 32       # rows per Ray Data batch: one actor call decodes and scores them (in ONNX Runtime calls of
#                 `batch_size`): large enough that Ray's cost per call is small against the images' cost


def filesystem(uri):
    """(pyarrow filesystem, root path) for a local folder, or a URI that pyarrow or an installed fsspec knows."""
    if "://" not in str(uri):
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        try:
            import fsspec
            fs, root = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as e2:
            raise UserError(f"{uri}: no filesystem for this URI (pyarrow: {e}; fsspec: {e2})") from None
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    return fs, root.rstrip("/")


def list_files(fs, root):
    """([{"path": relative, "size": bytes}] of the regular files under `root`, sorted; [relative] of the entries
    that are neither file nor folder (FIFOs, sockets, devices: reading one could block forever)."""
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise UserError(f"{root} is not a folder")
    files, odd = [], []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = info.path[len(root):].lstrip("/")
        if info.type == pafs.FileType.File:
            files.append({"path": rel, "size": info.size})
        elif info.type != pafs.FileType.Directory:
            odd.append(rel)
    return sorted(files, key=lambda f: f["path"]), sorted(odd)


def read_and_preprocess(batch, fs, root, transform, p, shape):
    """A Ray task: file names -> network input, or the server's reason for refusing the file (zeros then)."""
    xs, kinds, errors = [], [], []
    for rel, size in zip(batch["path"], batch["size"]):
        x, kind, error = None, "", ""
        try:
            if size > p.max_body_bytes:             # the server's limit: both refuse the same files
                raise InputError(413, "body_too_large", f"the file is over the limit of {p.max_body_bytes:,} bytes")
            with fs.open_input_stream(f"{root}/{rel}") as f:
                data = f.read(p.max_body_bytes + 1)     # a file grown since it was listed still stops at the limit
            if len(data) > p.max_body_bytes:
                raise InputError(413, "body_too_large", f"the file is over the limit of {p.max_body_bytes:,} bytes")
            x = preprocess(data, transform, p.max_pixels)
        except InputError as e:
            kind, error = e.kind, e.detail
        except OSError as e:
            kind, error = "unreadable", f"the file cannot be read: {e}"
        xs.append(np.zeros(shape, np.float32) if x is None else x)
        kinds.append(kind)
        errors.append(error)
    return {"path": batch["path"], "x": np.stack(xs), "kind": np.array(kinds, dtype=object),
            "error": np.array(errors, dtype=object)}


class Scorer:
    """A Ray actor: the card's model in ONNX Runtime, rows of network input -> top-k classes and probabilities.
    With `read` (read_and_preprocess's keyword arguments) its rows are files, which it reads and decodes itself.
    `lanes` calls may run at once, on threads of the actor (Ray Data's concurrent calls), each with an ONNX Runtime
    runner of its own."""

    def __init__(self, card, model_ref, threads, k, gpu, call_size, read=None, lanes=1):
        import ray

        with tempfile.TemporaryDirectory(prefix="batch-model-") as d:   # this worker's copy, checked again
            Path(d, "model.onnx").write_bytes(ray.get(model_ref))     # the bytes travel: no shared disk needed
            write_card(f"{d}/card.json", {**card, "model": f"{d}/model.onnx"})  # keeps the card's SHA-256
            self.call_size = call_size or call_size_here(card, threads, gpu)
            self.model = Model(f"{d}/card.json", threads, lanes, dynamic=self.call_size > 1)
            runners = [cuda_runner(f"{d}/model.onnx") or self.model.infer] if gpu else self.model.runners
        self.free = queue.SimpleQueue()             # the runners no call holds now
        for runner in runners:
            self.free.put(runner)
        self.k = k
        self.read = read

    def __call__(self, batch):
        if self.read is not None:
            batch = read_and_preprocess(batch, **self.read)
        ok = batch["kind"] == ""
        best = iter([])
        if ok.any():       # the server's path: calibrated probabilities and its abstention rule, once per batch
            x = batch["x"][ok]
            runner = self.free.get()
            try:
                calls = [runner.run(x[i:i + self.call_size]) for i in range(0, len(x), self.call_size)]
            finally:
                self.free.put(runner)
            probs, reasons = self.model.decide([np.concatenate(o) for o in zip(*calls)])
            best = iter([(top_k(row, self.model.classes, self.k), why) for row, why in zip(probs, reasons)])
        rows = []
        for path, good, kind, error in zip(batch["path"], ok, batch["kind"], batch["error"]):
            b, why = next(best) if good else (None, None)
            rows.append({"path": path, "kind": kind, "error": error} if b is None else
                        {"path": path, "kind": kind, "error": error, "top1": b[0]["class"],
                         "probability": b[0]["probability"], "top_k_classes": [c["class"] for c in b],
                         "top_k_probabilities": [c["probability"] for c in b], "abstained": why is not None,
                         "reason": why})
        return pa.Table.from_pylist(rows, schema=SCHEMA)


def cpu_actors(node_cpus, p):
    """(actors, lanes each) for scoring on CPUs, from each machine's (Ray node's) CPUs. By default an actor a
    machine, running as many calls at once as the machine has `batch_threads` CPUs, up to LANES_PER_ACTOR (where
    machines differ: lanes as many as the smallest has, actors as many as the cluster's lanes fill); with
    `batch_actors` set, the cluster's lanes shared among that many actors. One actor a lane, as before, started a
    worker process a lane in every job, and each imports Ray Data (pandas with it: about 1 s of CPU here) and loads
    the model. On 2 cores (Intel Xeon, AVX-512, 2026-12-07), alternated processes of fresh Ray, 2,000-image jobs:
    an actor a lane 130.1/131.4, 124.5/123.5, 122.7/125.9/128.0 and 114.5/117.1/117.7 img/s, an actor a machine
    130.1/130.0, 135.9/128.2, 128.0/123.0/126.6 and 120.7/121.5/121.3; a 16-image job 1.88-2.25 s against
    1.68-1.82 s."""
    lanes = [int(cpus) // p.batch_threads for cpus in node_cpus]
    if not any(lanes):              # an actor that asks for more CPUs than any machine has would wait forever
        raise UserError(f"serve.batch_threads is {p.batch_threads}, but no machine of the Ray cluster has that many "
                        f"CPUs (they have {sorted(int(c) for c in node_cpus)}): lower it")
    total = sum(lanes)
    if p.batch_actors:
        return p.batch_actors, max(1, total // p.batch_actors)
    each = min(LANES_PER_ACTOR, min(n for n in lanes if n > 0))
    return total // each, each


def call_size_here(card, threads, gpu):
    """Images per ONNX Runtime call for an actor with `threads` threads on this machine: on CPUs the fastest
    batch the deploy stage measured for lanes of that many threads (serve.model.policy: on this CPU and core count
    only; else its default); on a GPU, ROWS. On 2 cores batch 1 runs at 137 img/s and batch 8 at 94 (card
    "serving"), so calling ONNX Runtime per Ray Data batch would give a third of the speed away."""
    if gpu:
        return ROWS
    return policy(card, lanes=max(1, throughput.cores() // threads))[0]["max_batch_size"]


def cuda_runner(path):
    """`infer` (an object with `run`, as `runtime.Runner`) on ONNX Runtime's CUDA provider, or None where
    onnxruntime-gpu is not installed on this worker. stages.runtime makes CPU sessions only; this is the one GPU
    session (ONNX Runtime's defaults otherwise)."""
    import types

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    sess = ort.InferenceSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return types.SimpleNamespace(run=lambda x: sess.run(None, {name: x}))


def score(todo, fs, root, model, p):
    """Ray Data over `todo` ([{"path", "size"}]): pyarrow tables of results, `batch_part_rows` rows each."""
    from stages.cluster import ray_init

    ray = ray_init()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:                    # decoding tasks on the CPUs, scoring actors on the GPUs
        actors, lanes, per_actor = p.batch_actors or gpus, 1, {"num_gpus": 1, "num_cpus": 1}
    else:                       # each actor reads, decodes and scores its own rows on its share of the cores: no
        #                         float input (768 KiB an image at 256 px) becomes a Ray Data block. Two operators
        #                         that Ray Data fuses still convert each batch between them: alternated 2,000-image
        #                         jobs on 2 cores gave 108-118 img/s that way, 116-122 in one.
        actors, lanes = cpu_actors([n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]], p)
        per_actor = {"num_cpus": lanes * p.batch_threads}
    # the model's bytes go to the object store once and the actors' arguments carry a reference: Ray Data keys each
    # actor class by the repr of its arguments, which for the bytes themselves is a string 2.8x their size (41 MB
    # for a 14.5 MB model) that the driver builds and pickles to every actor with the class
    model_ref = ray.put(Path(model.card["model"]).read_bytes())
    read = dict(fs=fs, root=root, transform=model.transform, p=p,
                shape=(3, model.pp.input_size, model.pp.input_size))
    # 2 calls a block (Ray's default here cut 600 files into 200; on 2,000 images and 2 cores, alternated runs gave
    # 116-128 img/s at 8 calls a block, 130-134 at 2), and a block for every lane of a small job
    blocks = min(len(todo), max(actors * lanes, -(-len(todo) // (2 * ROWS))))
    ds = ray.data.from_items(todo, override_num_blocks=blocks)
    if gpus:
        ds = ds.map_batches(read_and_preprocess, batch_size=ROWS, batch_format="numpy", num_cpus=1, fn_kwargs=read)
    ds = ds.map_batches(Scorer, batch_size=ROWS, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=lanes,
                                                           enable_true_multi_threading=True),
                        fn_constructor_kwargs=dict(card=model.card, model_ref=model_ref, threads=p.batch_threads,
                                                   k=p.top_k, gpu=bool(gpus), call_size=p.batch_size,
                                                   read=None if gpus else read, lanes=lanes),
                        **per_actor)
    # no prefetch: with Ray Data's default of one batch, each batch waits until the next one is ready too (a
    # 2,000-image job wrote both of its 1,000-row parts at its very end, so a crash lost everything scored)
    yield from ds.iter_batches(batch_size=p.batch_part_rows, batch_format="pyarrow", prefetch_batches=0)


def run(card, images, out, p):
    """Score every file under `images` (a folder or URI) not yet in `out`; returns counts of this run's work."""
    # the card's SHA-256 is checked here, before anything is scored; the driver scores nothing: its one session
    # gives the metadata, and a clear error for a file ONNX Runtime cannot load
    model = Model(card, p.batch_threads, dynamic=False)
    sha = model.card["sha256"]
    fs, root = filesystem(images)
    files, odd = list_files(fs, root)
    if not files and not odd:
        raise UserError(f"{images} holds no files")
    out = Path(out)
    folder = out.with_name(out.name + ".parts") if out.suffix == ".csv" else out
    done = finished(folder, sha)
    index = 1 + max((int(f.stem.split("-")[1]) for f in part_files(folder)), default=-1)
    counts = {"skipped": len(done), "predicted": 0, "errors": 0}
    odd = [rel for rel in odd if rel not in done]
    if odd:
        write_part(folder, pa.table({"path": odd, "kind": ["not_a_file"] * len(odd),
                                     "error": ["neither a regular file nor a folder"] * len(odd)}), sha, index)
        counts["errors"], index = len(odd), index + 1
    todo = [f for f in files if f["path"] not in done]
    if todo:
        for table in score(todo, fs, root, model, p):
            write_part(folder, table, sha, index)
            index += 1
            failed = pc.sum(pc.not_equal(table["kind"], "")).as_py() or 0
            counts["errors"] += failed
            counts["predicted"] += table.num_rows - failed
    if out.suffix == ".csv":
        write_csv(folder, out)
    return counts


def main():
    args = parser(__doc__, ("--card", "the model card JSON written by the deploy stage"),
                  ("--images", "a folder or URI (s3://..., searched recursively)"),
                  ("--out", "a folder of Parquet tables, or a .csv file")).parse_args()
    c = run(args.card, args.images, args.out, load_section(Params, "serve"))
    print(f"batch: {c['predicted']} images predicted, {c['errors']} files not usable, {c['skipped']} already "
          f"done -> {args.out}")


if __name__ == "__main__":
    cli(main)
