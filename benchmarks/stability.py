"""Is the deploy choice stable under timing noise? The deploy stage run N times in a row on this machine, from its
own inputs (dvc.yaml's command, as `stages.recheck` reads it) and params.yaml's `deploy` params, each into a
temporary folder (the pipeline's outputs are not touched): the variant each run ships, and per candidate the
decisive statistic (the lower quartile of its paired-round speed-ups over ONNX FP32) against `min_speedup`.
Prints a table and a verdict; exit status 1 when the runs did not all ship the same variant.
Run from the project root after `make run`: python -m benchmarks.stability [--runs 5]
"""
import argparse
import contextlib
import os
import sys
import tempfile
import time

from stages import deploy
from stages.config import cli, load_section
from stages.machine import describe
from stages.recheck import stage_args


def runs(n, p):
    """[(variant, {candidate: speedup_fp32_q1}, {candidate: reason}, seconds)] of `n` deploy runs."""
    a, out = stage_args(), []
    for i in range(n):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="stability-") as tmp, contextlib.redirect_stdout(sys.stderr):
            card, table, report = deploy.run(a.checkpoint, a.onnx, a.pruned, a.manifest, tmp, p)   # its log
        out.append((card["variant"], {k: v["speedup_fp32_q1"] for k, v in table.items() if k != deploy.BASELINE},
                    report["reasons"], time.perf_counter() - start))
        print(f"stability: run {i + 1}/{n}: {card['variant']} ({card['reason']}) in {out[-1][3]:.0f} s",
              file=sys.stderr, flush=True)
    return out


def report(results, p):
    names = list(results[0][1])
    lines = [f"deploy stability: {len(results)} runs of the deploy stage on {describe()} (load average "
             f"{os.getloadavg()[0]:.1f} at the end); rule: a variant replaces {deploy.FALLBACK} when the lower "
             f"quartile of its per-round batch-1 speed-ups over it is at least {p.budget.min_speedup}x "
             "(and it keeps the accuracy budget)", "",
             "| run | ships | " + " | ".join(f"{n} q1 speed-up (margin)" for n in names) + " | s |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for i, (variant, q1, _, s) in enumerate(results, 1):
        lines.append(f"| {i} | {variant} | " + " | ".join(
            f"{q1[n]:.2f}x ({q1[n] - p.budget.min_speedup:+.2f})" if n != deploy.FALLBACK else "1.00x (fallback)"
            for n in names) + f" | {s:.0f} |")
    shipped = sorted({r[0] for r in results})
    lines += ["", f"verdict: {'STABLE' if len(shipped) == 1 else 'UNSTABLE'}: the runs shipped "
              f"{', '.join(shipped)}", "", "reasons of the last run:"]
    lines += [f"- {n}: {why}" for n, why in results[-1][2].items()]
    return "\n".join(lines), len(shipped) == 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    p = load_section(deploy.Params, "deploy")
    text, stable = report(runs(args.runs, p), p)
    print(text)
    sys.exit(0 if stable else 1)


if __name__ == "__main__":
    cli(main)
