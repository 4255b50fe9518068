"""report: one static HTML page after a run: val metrics, the confusion matrix, suspected mislabels, Grad-CAM
of the errors, the hardest examples, the deploy stage's choice and the trust figures when they exist.

Reads the other stages' outputs only (no model, no torch); every image is inlined as base64, so the page is one
file that opens offline. Plain HTML and CSS, no script.
"""
import base64
import csv
import dataclasses
import html
import io
import json
import time
from pathlib import Path

from stages import presets
from stages.config import atomic_text, cli, load_section, parser
from stages.scores import headline

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}img.fig{max-width:100%}section{margin-bottom:2.5em}.note{color:#777}
td img{display:block}"""


@dataclasses.dataclass(frozen=True)
class Params:
    max_rows: int = 50                 # rows shown per table of images (label issues, hardest examples)
    thumb_px: int = 96                 # longer side of the inlined thumbnails


def esc(v):
    return html.escape(str(v))


def data_uri(path, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def thumb(row, px):
    """An <img> of the row's image (its cached copy when there is one), `px` on its longer side, inline."""
    path = row.get("cached") or row["path"]
    try:
        im = presets.load_rgb(path)
    except OSError:
        return f'<span class="note">{esc(Path(path).name)} unreadable</span>'
    im.thumbnail((px, px))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return f'<img alt="{esc(Path(row["path"]).name)}" src="data:image/jpeg;base64,' \
           f'{base64.b64encode(buf.getvalue()).decode()}">'


def table(rows, cols, px=0):
    """An HTML table of dicts: `cols` as columns (a leading image column when `px`)."""
    head = ("<th>image</th>" if px else "") + "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + (f"<td>{thumb(r, px)}</td>" if px else "")
                   + "".join(f"<td>{esc(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(path, alt):
    path = Path(path)
    if not path.is_file():
        return f'<p class="note">{esc(path)} not found</p>'
    return f'<p><img class="fig" alt="{esc(alt)}" src="{data_uri(path)}"></p>'


def section(key, title, body):
    return f'<section id="{key}"><h2>{esc(title)}</h2>{body}</section>'


def read_json(path):
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def read_csv(path):
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def flat(d, prefix=""):
    """{'a': {'b': 1}} -> [('a.b', 1)]: nested metrics as table rows."""
    out = []
    for k, v in d.items():
        out += flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return out


def metrics_section(m):
    per = [{"class": c, **v} for c, v in m["pytorch"]["per_class"].items()]
    return "".join(f"<p>{esc(line)}</p>" for line in headline(m)) + table(per, ["class", "precision", "recall", "f1",
                                                                                 "support"])


def labels_section(lab, m, p):
    issues = read_csv(Path(lab) / "issues.csv")
    head = (f"<p>{m['suspects']} suspected mislabels among {m['train_holdout_images']} train/holdout images "
            f"(the out-of-sample probe puts them in another class), {m['confident']} of them confident "
            f"(<code>{esc(m['filter_by'])}</code>; rule <code>labels.label_issue: {esc(m['rule'])}</code>, "
            f"{m['dropped']} left out of training); "
            f"{m['val_suspects']} of {m['val_images']} val images (reported, never dropped). Out-of-sample "
            f"probe accuracy {m['oof_accuracy']}.</p>")
    if not issues:
        return head + '<p class="note">no suspected label issues</p>'
    cols = ["rank", "split", "label", "suggested", "label_quality", "confident", "action", "path"]
    more = f'<p class="note">{len(issues) - p.max_rows} more in issues.csv</p>' if len(issues) > p.max_rows else ""
    return head + table(issues[:p.max_rows], cols, p.thumb_px) + more


def hardest_section(exp, m, p):
    pairs = table(m["most_confused"], ["actual", "predicted", "count"]) if m["most_confused"] else \
        '<p class="note">no class confused with another on val</p>'
    rows = read_csv(Path(exp) / "hardest.csv")[:p.max_rows]
    return (f"<h3>most confused pairs</h3>{pairs}<h3>top losses</h3>"
            + table(rows, ["rank", "actual", "predicted", "p_actual", "loss", "path"], p.thumb_px))


def deploy_section(dep):
    card, rep = read_json(Path(dep) / "card.json"), read_json(Path(dep) / "report.json")
    if not card:
        return f'<p class="note">{esc(dep)}/card.json not found</p>'
    body = (f"<p>shipped variant <b>{esc(card['variant'])}</b>: {esc(card.get('reason', ''))}</p>"
            + table([{"metric": k, "value": v} for k, v in flat(card.get("metrics", {}))], ["metric", "value"]))
    if rep and "reasons" in rep:
        body += table([{"variant": k, "why": v} for k, v in rep["reasons"].items()], ["variant", "why"])
    return body + figure(Path(dep) / "tradeoff.png", "accuracy against latency")


def trust_section(trust):
    trust = Path(trust) if trust else None
    if not trust or not trust.is_dir():
        return '<p class="note">no trust outputs (outputs/trust) in this run: section skipped</p>'
    m = read_json(trust / "metrics.json")
    body = table([{"metric": k, "value": v} for k, v in flat(m)], ["metric", "value"]) if m else \
        '<p class="note">no metrics.json</p>'
    return body + "".join(figure(f, f.stem) for f in sorted(trust.glob("*.png")))


def run(out_dir, evaluate, labels, explain, deploy, trust, p):
    """Write `out_dir`/index.html from the stages' outputs; returns (path, summary line)."""
    t0 = time.perf_counter()
    ev, lab, exp = read_json(Path(evaluate) / "metrics.json"), read_json(Path(labels) / "metrics.json"), \
        read_json(Path(explain) / "metrics.json")
    sections = [
        section("metrics", "Accuracy and per-class metrics (val)", metrics_section(ev)),
        section("confusion", "Confusion matrix", figure(Path(evaluate) / "confusion.png", "confusion matrix")),
        section("labels", "Suspected label issues", labels_section(labels, lab, p)),
        section("gradcam", "Grad-CAM: val errors and least confident answers",
                f"<p>{exp['misclassified']} of {exp['val_images']} val images wrong; heatmaps at layer "
                f"<code>{esc(exp['gradcam_layer'])}</code> for the predicted class</p>"
                + figure(Path(explain) / "gradcam.png", "Grad-CAM grid")),
        section("hardest", "Hardest examples (val)", hardest_section(explain, exp, p)),
        section("deploy", "Deployed model", deploy_section(deploy)),
        section("trust", "Trust and robustness", trust_section(trust)),
    ]
    line = (f"val accuracy {ev['pytorch']['accuracy']:.4f}; {lab['suspects']} suspected mislabels in "
            f"train/holdout ({lab['confident']} confident, {lab['dropped']} dropped), {lab['val_suspects']} in val; "
            f"{exp['misclassified']} val errors explained")
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Run report</title>"
            f"<style>{CSS}</style></head><body><h1>Run report</h1><p id=\"summary\">{esc(line)}</p>"
            + "".join(sections) + "</body></html>\n")
    path = Path(out_dir) / "index.html"
    atomic_text(path, page)
    return path, f"{line}; {round(time.perf_counter() - t0, 1)} s"


def main():
    ap = parser(__doc__, "--evaluate", "--labels", "--explain", "--deploy", "--out")
    ap.add_argument("--trust", help="the trust stage's folder; skipped with a note when absent")
    args = ap.parse_args()
    path, line = run(args.out, args.evaluate, args.labels, args.explain, args.deploy, args.trust,
                     load_section(Params, "report"))
    print(f"report: {path}: {line}")


if __name__ == "__main__":
    cli(main)
