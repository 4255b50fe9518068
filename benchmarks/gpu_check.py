"""GPU check: the default train recipe on 1 GPU and, where there are several, on all of them (Ray Train, DDP over
NCCL), on generated photos: images/s, loader wait and peak GPU memory per fine-tune epoch. Prints a markdown
table and returns a dict; on a machine without a CUDA GPU it says so in one line and exits 0.

    python -m benchmarks.gpu_check --images 2000
"""
import argparse
import dataclasses
import tempfile
from pathlib import Path

from benchmarks.prepare_scale import make_folder
from stages.machine import describe


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="generated 640x480 JPEGs, 3 classes")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tune epochs (the first one warms up)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible on this machine; nothing to check")
        return None
    from stages import prepare, train
    from stages.config import PARAMS, load_section

    gpus = torch.cuda.device_count()
    recipe = load_section(train.Params, "train") if PARAMS.exists() else train.Params()
    print(f"gpu_check: {gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, recipe {recipe.backbone} "
          f"{recipe.strategy}, batch {recipe.batch_size}; {describe()}")
    results = {"gpus": gpus, "gpu": torch.cuda.get_device_name(0), "cpu": describe(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_folder(tmp / "src", args.images, 640)
        prepare.run(tmp / "src", tmp / "prepare", prepare.Params(source=str(tmp / "src")))
        for workers in sorted({1, gpus}):
            p = dataclasses.replace(recipe, workers=workers, ft_epochs=args.epochs,
                                    batch_size=recipe.batch_size // workers * workers)
            result = train.run(tmp / "prepare" / "manifest.csv", tmp / f"train{workers}", p, "cuda")
            for row in result["history"]:
                if row["phase"] == "finetune":
                    results["runs"].append({"gpus": workers, **{k: row.get(k) for k in (
                        "epoch", "images_per_s", "seconds", "loader_wait_s", "gpu_mem_mb", "holdout_acc")}})
    print(table(results["runs"]))
    return results


def table(runs):
    lines = ["| GPUs | epoch | images/s | epoch s | loader wait s | peak GPU memory MB (rank 0) | holdout acc |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['gpus']} | {r['epoch']} | {r['images_per_s']} | {r['seconds']} | {r['loader_wait_s']} | "
              f"{r['gpu_mem_mb']} | {r['holdout_acc']} |" for r in runs]
    return "\n".join(lines)




if __name__ == "__main__":
    main()
