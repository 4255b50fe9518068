"""The benchmark's PNG plots, one figure per part, from the results dict (medians drawn, min-max as error bars)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def errbar(s):
    """(median, [[below], [above]]) of a spread, for matplotlib's yerr."""
    return s["median"], [[s["median"] - s["min"]], [s["max"] - s["median"]]]


def finish(ax, legend=None, grid="both", **labels):
    """An axis's labels (`ax.set`'s keywords), light grid lines, and a legend with `legend`'s keywords if given."""
    ax.set(**labels)
    ax.grid(alpha=0.3, axis=grid)
    if legend is not None:
        ax.legend(**legend)


def training(parts):
    """Val accuracy per classic epoch, and against wall time, with the pipeline's runs as points."""
    t, sc = parts["train"], parts.get("scratch", {})
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    curves = [("classic loop, imagenet", t["classic"]["history"], "C1")]
    points = [("pipeline, imagenet", t["pipeline"], "C0")]
    if "error" not in sc:
        curves.append(("classic loop, from scratch", sc["classic_scratch"]["history"], "C3"))
        points.append(("pipeline recipe, from scratch", sc["scratch"], "C2"))
    for label, h, color in curves:
        a.plot([e["epoch"] for e in h], [e["val_acc"] for e in h], "o-", c=color, label=label)
        b.plot([e["wall_s"] for e in h], [e["val_acc"] for e in h], "o-", c=color, label=label)
    for label, p, color in points:
        a.axhline(p["val_acc"]["median"], c=color, ls="--", label=f"{label} (final)")
        w, err = errbar(p["wall_s"])
        b.errorbar([w], [p["val_acc"]["median"]], xerr=err, fmt="*", ms=14, c=color, label=label)
    for ax in (a, b):
        ax.axhline(t["target"], c="grey", lw=0.8, ls=":")
    finish(a, {"fontsize": 7, "loc": "lower right"}, xlabel="classic epoch", ylabel="val accuracy",
           title="val accuracy after every epoch")
    finish(b, xlabel="wall time, s (training + per-epoch evaluation)", title="accuracy against time")
    return fig


def deploy(parts):
    """Batch-1 latency p50 (bar) and p99 (tick), and batch throughput, per variant and thread count."""
    d = parts["deploy"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(next(iter(d["tables"].values())))
    width, idx = 0.8 / len(d["tables"]), np.arange(len(names))
    bkey = f"throughput_b{d['batch_size']}"
    for i, (th, table) in enumerate(d["tables"].items()):
        pos = idx + i * width
        a.bar(pos, [table[n]["latency_ms_p50"] for n in names], width, label=f"{th} thread(s), p50")
        a.scatter(pos, [table[n]["latency_ms_p99"] for n in names], marker="_", s=200, c="k", zorder=3)
        med = [table[n][bkey] for n in names]
        b.bar(pos, med, width, label=f"{th} thread(s)",
              yerr=[[m - table[n][f"{bkey}_min"] for m, n in zip(med, names)],
                    [table[n][f"{bkey}_max"] - m for m, n in zip(med, names)]])
    for ax, ylabel, title in ((a, "ms", "batch-1 latency (bar: p50, tick: p99)"),
                              (b, "images/s", f"batch-{d['batch_size']} throughput (min-max)")):
        ax.set_xticks(idx + width * (len(d["tables"]) - 1) / 2, names, rotation=20, fontsize=8)
        finish(ax, {"fontsize": 8}, "y", ylabel=ylabel, title=title)
    return fig


def overhead(parts):
    o = parts["overhead"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = [("dvc repro\n(nothing to do)", o["dvc_noop_s"]), ("Prefect flow\n(all Cached)", o["flow_cached_s"])]
    for i, (label, s) in enumerate(bars):
        m, err = errbar(s)
        ax.bar(i, m, yerr=err, color=f"C{i}", capsize=6)
    ax.bar(2, o["server_start_s"], color="C7")
    ax.set_xticks(range(3), [b[0] for b in bars] + ["Prefect server\nstart (once)"], fontsize=8)
    finish(ax, grid="y", ylabel="seconds", title="orchestration overhead (median, min-max)")
    return fig


def serving(parts):
    s = parts["serving"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    levels = [int(c) for c in s["levels"]]
    a.plot(levels, [s["levels"][str(c)]["img_s"]["median"] for c in levels], "o-", label="server, 1 image per request")
    b_ = s["limit"]["best"]
    a.axhline(s["inprocess"]["median"], c="C1", ls="--", label=f"in-process limit, decode included (batch "
              f"{b_['batch']}, {b_['lanes']} lane(s) x {b_['threads']} thread(s))")
    for key, ls in (("p50_ms", "o-"), ("p99_ms", "s--")):
        b.plot(levels, [s["levels"][str(c)][key]["median"] for c in levels], ls, label=key.split("_")[0])
    for ax, ylabel, title in ((a, "images/s", "throughput"), (b, "ms", "request latency")):
        finish(ax, {"fontsize": 8}, xscale="log", xticks=levels, xticklabels=levels, xlabel="concurrency",
               ylabel=ylabel, title=title)
    return fig


# part -> (file name, figure); each needs its own part to have succeeded
PLOTS = {"train": ("training", training), "deploy": ("deploy", deploy), "overhead": ("overhead", overhead),
         "serving": ("serving", serving)}
