"""RESULTS.md and the plots from the benchmark's results dict: the headline ratios first, then a section per part."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks import plots  # noqa: E402

TITLES = {"train": "1. Train recipe: the pipeline against the classic tutorial loop",
          "scratch": "2. Transfer against training from scratch, same budget",
          "deploy": "3. Deploy variants", "overhead": "4. Pipeline overhead with nothing to do",
          "serving": "5. Serving: HTTP service against the in-process limit"}
HOW = {"train": "`benchmarks.recipes.compare`: `stages.train.run` (params.yaml `train`) against the classic loop",
       "scratch": "`benchmarks.recipes.scratch`: `stages.train.run` with `weights: none`, and the classic loop "
                  "from scratch",
       "deploy": "`benchmarks.variants.run`: `stages.export.run`, `stages.prune.run`, `stages.candidates.variants`, "
                 "`stages.candidates.measure` at each thread count",
       "overhead": "`benchmarks.overhead.run`: `dvc repro` and `python -m flows.pipeline` against "
                   "`flows.server.ensure`'s server",
       "serving": "`benchmarks.serving.run`: `stages.throughput.sweep`, `benchmarks.serve_bench` (`start_server`, `load`)"}


def s3(s, digits=1, unit=""):
    """A spread as `min / median / max` (n)."""
    if not s:
        return "n/a"
    return f"{s['min']:.{digits}f} / {s['median']:.{digits}f} / {s['max']:.{digits}f}{unit} (n={s['n']})"


def x(s, digits=2):
    return "n/a" if not s else f"{s['median']:.{digits}f}x ({s['min']:.{digits}f}-{s['max']:.{digits}f}, n={s['n']})"


def headline(parts):
    rows = []
    t, sc, d, o, sv = (parts.get(k, {}) for k in ("train", "scratch", "deploy", "overhead", "serving"))
    if "error" not in t:
        c = t["classic"]
        rows.append(("train wall time, classic loop / pipeline", x(t["ratio_wall"]),
                     f"classic loop, {c['epochs']} epoch(s): {t_(c['wall_s'])} s; "
                     f"pipeline: {t_(t['pipeline']['wall_s'])} s"))
        rows.append(("val accuracy, pipeline - classic (final / best epoch)",
                     f"{t['acc_diff_final']:+.4f} / {t['acc_diff_best']:+.4f}",
                     f"pipeline {t['pipeline']['val_acc']['median']:.4f}; classic final {c['final_val_acc']:.4f}, "
                     f"best {c['best_val_acc']:.4f}; classic reached {t['target']} "
                     + (f"after {c['time_to_target_s']:.0f} s" if c["time_to_target_s"] is not None else "never")))
    if "error" not in sc:
        rows.append(("val accuracy, transfer - scratch (pipeline recipe / classic loop)",
                     f"{sc['acc_diff']:+.4f} / {sc['acc_diff_classic']:+.4f}",
                     f"{sc['epochs']} epochs from scratch: {sc['scratch']['val_acc']['median']:.4f} in "
                     f"{t_(sc['scratch']['wall_s'])} s ({sc['ratio_wall']:.2f}x the transfer run's time)"))
    if "error" not in d:
        for th, table in d["tables"].items():
            best = max((n for n in table if n != "pytorch_fp32"), key=lambda n: table[n]["speedup_b1"])
            rows.append((f"deploy: batch-1 speed-up over PyTorch eager, {th} thread(s)",
                         f"{table[best]['speedup_b1']:.2f}x ({best}); {after_batch(table, best):.2f}x once "
                         "PyTorch has run a batch",
                         ", ".join(f"{n} {v['speedup_b1']:.2f}x" for n, v in table.items() if n != "pytorch_fp32")
                         + f"; deploy rule picks {d['chosen']}"))
    if "error" not in o:
        rows.append(("cached Prefect flow / no-op `dvc repro`", x(o["ratio_flow_vs_dvc"]),
                     f"flow {t_(o['flow_cached_s'])} s, dvc {t_(o['dvc_noop_s'])} s; Prefect server start "
                     f"{o['server_start_s']} s (once)"))
    if "error" not in sv:
        lv = sv["levels"]["32"]
        b = sv["limit"]["best"]
        rows.append(("server at concurrency 32 / in-process limit, decode included (img/s)", x(lv["vs_limit"]),
                     f"server {t_(lv['img_s'])} img/s, limit {t_(sv['inprocess'])} img/s (batch {b['batch']}, "
                     f"{b['lanes']} lane(s) x {b['threads']} thread(s))"))
    lines = ["| comparison | ratio / difference (median, min-max) | detail (medians) |", "|---|---|---|"]
    return lines + [f"| {a} | {b} | {c} |" for a, b, c in rows]


def t_(s):
    return "n/a" if not s else f"{s['median']:.1f}"


def section_train(t):
    p, c = t["pipeline"], t["classic"]
    lines = ["| recipe | wall time, s (min / median / max) | val accuracy | best epoch | time to "
             f"{t['target']}, s | epochs | epoch train time, s |", "|---|---|---|---|---|---|---|",
             f"| pipeline (`{p_recipe(t['recipe']['pipeline'])}`) | {s3(p['wall_s'])} | {p['val_acc']['median']:.4f} "
             f"| - | not measured (val is never seen) | {fmt_pipe_epochs(p['history'])} | - |",
             f"| classic loop (Adam {t['recipe']['classic']['lr']} on all weights, RandomResizedCrop + flip) | "
             f"{s3(c['wall_s'])} | {c['final_val_acc']:.4f} | {c['best_val_acc']:.4f} | "
             f"{'never' if c['time_to_target_s'] is None else round(c['time_to_target_s'], 1)} | {c['epochs']} | "
             f"{s3(c['epoch_train_s'])} |", "",
             f"The classic loop trains on train + holdout ({c['train_images']} images) and scores val after every "
             f"epoch (its wall time includes that, as the tutorial's does; training alone: {s3(c['train_only_s'])} s). "
             "Accuracy is of one run per recipe: training is deterministic on the CPU.", "",
             "| classic epoch | train loss | val accuracy | train s | eval s | wall s |", "|---|---|---|---|---|---|"]
    lines += [f"| {e['epoch']} | {e['train_loss']} | {e['val_acc']:.4f} | {e['train_s']} | {e['eval_s']} | "
              f"{e['wall_s']} |"
              for e in c["history"]]
    lines += ["", "| pipeline phase | epoch | train loss | holdout loss | holdout accuracy | s |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {h['phase']} | {h['epoch']} | {h['train_loss']} | {h['holdout_loss']} | {h['holdout_acc']} | "
              f"{h['seconds']} |" for h in p["history"]]
    return lines + ["", "![val accuracy per epoch and against wall time](training.png)"]


def p_recipe(r):
    return f"{r['backbone']} {r['weights']} {r['strategy']}, ft_epochs {r['ft_epochs']}"


def fmt_pipe_epochs(history):
    return f"{sum(h['phase'] == 'finetune' for h in history)} fine-tune (+ linear probe)" \
        if any(h["phase"] == "linear_probe" for h in history) else str(len(history))


def section_scratch(s):
    c = s["classic_scratch"]
    return ["| run | weights | wall time, s (min / median / max) | val accuracy |", "|---|---|---|---|",
            f"| transfer: pipeline recipe (part 1) | imagenet | {s3(s['transfer']['wall_s'])} | "
            f"{s['transfer']['val_acc']['median']:.4f} |",
            f"| pipeline recipe from scratch (finetune, {s['epochs']} epochs) | none | {s3(s['scratch']['wall_s'])} | "
            f"{s['scratch']['val_acc']['median']:.4f} |",
            f"| classic loop from scratch ({c['epochs']} epochs) | none | {s3(c['wall_s'])} | "
            f"{c['final_val_acc']:.4f} (best {c['best_val_acc']:.4f}) |", "",
            "Same total epochs: the pipeline's fine-tune epochs plus one for its linear probe's pass over train. "
            "The pipeline recipe keeps BatchNorm statistics frozen and the body at a 10x lower rate, which suits "
            "pretrained weights, not random ones; the classic loop from scratch is the fairer scratch baseline."]


def after_batch(table, n):
    """Variant `n`'s batch-1 speed-up over PyTorch eager, both timed after their batch runs."""
    return table["pytorch_fp32"]["latency_ms_p50_after_batch"] / table[n]["latency_ms_p50_after_batch"]


def section_deploy(d):
    t = d["timing"]
    lines = [f"Val images {d['val_images']}; each variant in a process of its own; batch-1 latency over "
             f"{t['rounds']} interleaved rounds x {t['repeats']} runs, then batch-{d['batch_size']} throughput over "
             f"{t['rounds']} x {t['batch_repeats']} runs, then batch-1 latency again ('after a batch': see "
             f"`stages/deploy.py` on PyTorch's page faults); pruning: {d['prune']['ratio']} of channels "
             f"({d['prune']['params_kept']:.0%} of parameters, {d['prune']['macs_kept']:.0%} of MACs kept), "
             f"prune stage (pruning + recovery) {d['prune_s']} s; variants built in {d['quantize_s']} s. "
             f"The deploy rule "
             f"(budget {d['budget']}) picks **{d['chosen']}**: {d['reasons'].get(d['chosen'], '')}", ""]
    b = f"b{d['batch_size']}"
    for th, table in d["tables"].items():
        lines += [f"**{th} thread(s)**", "",
                  "| variant | val accuracy | agreement with PyTorch | size MB | batch-1 p50 ms "
                  f"| p99 ms | min / max ms | batch-{d['batch_size']} img/s (min / median / max) | batch-1 speed-up "
                  "| batch-1 p50 ms after a batch | speed-up after a batch |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {n} | {v['accuracy']:.4f} | {v['agreement']:.4f} | {v['size_mb']:.2f} | "
                  f"{v['latency_ms_p50']:.2f} | "
                  f"{v['latency_ms_p99']:.2f} | {v['latency_ms_min']:.2f} / {v['latency_ms_max']:.2f} | "
                  f"{v[f'throughput_{b}_min']:.1f} / {v[f'throughput_{b}']:.1f} / {v[f'throughput_{b}_max']:.1f} | "
                  f"{v['speedup_b1']:.2f}x | {v['latency_ms_p50_after_batch']:.2f} | "
                  f"{after_batch(table, n):.2f}x |" for n, v in table.items()]
        lines.append("")
    return lines + ["![latency and throughput per variant](deploy.png)"]


def section_overhead(o):
    return [f"On {o['repo']}; every repeat runs `dvc repro` then `python -m flows.pipeline`; every stage up to date "
            f"and every flow task Cached in every repeat: {'yes' if o['all_cached'] else '**NO**'} "
            f"(stages: {', '.join(o['stages'])}). Bringing the pipeline up to date first took {o['bring_up_s']} s "
            + ("(beside parts 1-3 and 5 with --quick; " if o["repo"].startswith("a tiny") else "(")
            + "not part of the figures).", "", "| what | s (min / median / max) |", "|---|---|",
            f"| `dvc repro`, nothing to do | {s3(o['dvc_noop_s'], 2)} |",
            f"| `python -m flows.pipeline`, every stage Cached | {s3(o['flow_cached_s'], 2)} |",
            f"| flow - dvc, pair by pair | {s3(o['flow_minus_dvc_s'], 2)} |",
            f"| Prefect server start (`flows.server.ensure`, once) | {o['server_start_s']} |", "",
            "![overhead](overhead.png)"]


def section_serving(s):
    lim = s["limit"]
    lines = [f"Model {s['model']}; image {s['image']} ({s['image_bytes']:,} bytes); {s['seconds']} s per phase, "
             f"{s['repeats']} repeat(s); server params {s['params']} (0: the sweep's best); server start "
             f"{s['server_start_s']} s.", "",
             f"The in-process limit: decode + ONNX Runtime images/s at each batch size and split of the "
             f"{lim['cores']} cores into lanes (concurrent calls) x intra-op threads, median of {lim['rounds']} "
             f"rotated rounds of {lim['seconds']} s (`stages.throughput.sweep`; the deploy stage runs the same "
             "sweep and the server takes its defaults from it).", "",
             "| batch | lanes x threads | img/s |", "|---|---|---|"]
    lines += [f"| {v['batch']} | {v['lanes']} x {v['threads']} | "
              + (f"**{v['img_s']}** (the limit) |" if v == lim["best"] else f"{v['img_s']} |")
              for v in lim["settings"]]
    lines += ["", "| mode | img/s (min / median / max) | p50 ms | p99 ms | mean batch | errors | requests "
              "| / in-process limit |", "|---|---|---|---|---|---|---|---|",
              f"| in process, the limit's setting (before and after each phase) | {s3(s['inprocess'])} "
              "| | | | | | |"]
    lines += [f"| server, concurrency {c} | {s3(v['img_s'])} | {t_(v['p50_ms'])} | {t_(v['p99_ms'])} | "
              f"{t_(v['mean_batch'])} | {v['errors']} | {v['requests']} | {x(v['vs_limit'])} |"
              for c, v in s["levels"].items()]
    cpu = [(c, v["cpu_ms"]) for c, v in s["levels"].items() if v.get("cpu_ms")]
    if cpu and s.get("inprocess_cpu_ms"):       # runs before the counts were kept have none
        lines += ["", "CPU time per request (medians, ms): " + "; ".join(
            f"concurrency {c}: server {m['server']['median']}, its nginx {m['nginx']['median']}, client "
            f"{m['client']['median']}" for c, m in cpu) + f"; in process {s['inprocess_cpu_ms']['median']} ms an "
            "image (decode + ONNX Runtime at the limit's setting)."]
    return lines + ["", "![serving](serving.png)"]


SECTIONS = {"train": section_train, "scratch": section_scratch, "deploy": section_deploy,
            "overhead": section_overhead, "serving": section_serving}


def guarded(render, data):
    """A renderer's lines; when it fails on what a run recorded, one line that says so (results.json has all)."""
    try:
        return render(data)
    except Exception as e:
        return [f"**REPORT ERROR** ({type(e).__name__}: {e}); the figures are in results.json"]


def markdown(r):
    m = r["machine"]
    lines = ["# Benchmarks: the pipeline against the classic recipe and the usual alternatives", ""]
    if r["quick"]:
        lines += ["> **QUICK RUN (`--quick`): a few images per class, one epoch, one repeat, short phases. It only "
                  "checks that the harness works; THE NUMBERS BELOW MEAN NOTHING.**", ""]
    lines += [f"Command: `{r['command']}` · {r['date']} · {m['cores']} cores ({m['cpu']}) · load average "
              f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end · run took "
              f"{r['seconds'] / 60:.1f} min", "",
              "Every part ran on this machine, in this one run. Timings are min / median / max over repeats (n "
              "given); each ratio is taken pair by pair between measurements made side by side.", "",
              "## Headline", ""] + guarded(headline, r["parts"])
    for key, title in TITLES.items():
        part = r["parts"].get(key, {"error": "not run"})
        lines += ["", f"## {title}", "", f"Command: `{r['command']}` (part {title[0]}: {HOW[key]}; "
                                         f"{part.get('part_s', 0):.0f} s)", ""]
        lines += [f"**FAILED**: {part['error']}"] if "error" in part else guarded(SECTIONS[key], part)
        if part.get("plot_error"):
            lines += ["", f"**PLOT FAILED**: {part['plot_error']}"]
    lines += ["", "## Machine", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in m.items()]
    return "\n".join(lines) + "\n"


def write(results, out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for key, (name, draw) in plots.PLOTS.items():
        if "error" not in results["parts"].get(key, {"error": "not run"}):
            try:
                fig = draw(results["parts"])
                fig.tight_layout()
                fig.savefig(out / f"{name}.png", format="png", dpi=100)
                plt.close(fig)
            except Exception as e:
                results["parts"][key]["plot_error"] = f"{type(e).__name__}: {e}"
    text = markdown(results)
    across = out / "DATASETS.md"        # benchmarks.datasets' table, when it has run: the recipe on every set
    if across.exists():
        body = across.read_text().split("\n", 1)[1].strip()
        text = text.replace("\n## Machine\n", f"\n## 6. Across data sets (`python -m benchmarks.datasets`)\n\n"
                                               f"{body}\n\n## Machine\n")
    (out / "RESULTS.md").write_text(text)
