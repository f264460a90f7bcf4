"""The report's HTML page: one static file, no external CSS / JS / fonts, images by relative path."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

from raytrain.eval.metrics.table import format_value
from raytrain.eval.report.analysis import metric_columns
from raytrain.eval.report.draw import GT_COLOUR, PRED_COLOUR

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:1.5em} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em} h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:8px 0 16px} th,td{border:1px solid #ddd;padding:3px 8px;font-size:.9em}
th{background:#f4f4f4;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
.notes{background:#fff8e1;border:1px solid #f0d98a;padding:8px 16px} .meta{color:#555;font-size:.9em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
figure{margin:0;border:1px solid #e3e3e3;padding:6px;background:#fafafa} figure img{width:100%;height:auto;image-rendering:pixelated}
figcaption{font-size:.8em;word-break:break-all} code,pre{font-size:.85em;background:#f4f4f4}
.legend span{display:inline-block;margin-right:18px} img.fig{max-width:100%}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if i >= numeric_from else f"<td>{_e(c)}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _metrics_html(metrics: dict, summary: Sequence[dict] = ()) -> str:
    """The headline rows of ``analysis.summary`` (COCO mAP / AP50 / AP75 / mAR, point P/R/F1,
    ECE) when the columns hold them; one table of top-level metrics (rows) x columns (trained /
    untrained / baseline), one per sub-dict (boxes, ...), and the parse-error counts; values
    through table.format_value."""
    cols = metric_columns(metrics)
    if not cols:
        return "<p>eval/metrics.json has no metric columns.</p>"
    parts = []
    if summary:
        parts.append("<h3>summary</h3>" + _table(["metric", *cols], [
            [r["title"], *(format_value(r["values"].get(c)) if c in r["values"] else "-" for c in cols)] for r in summary]))

    def rows_of(get) -> list[str]:
        keys: dict[str, None] = {}
        for c in cols:
            for k, v in (get(metrics[c]) or {}).items():
                if not isinstance(v, (dict, list)):
                    keys[k] = None
        return list(keys)

    top = rows_of(lambda d: d)
    if top:
        parts.append("<h3>pointing and totals</h3>" + _table(["metric", *cols], [[k, *(format_value(metrics[c].get(k)) for c in cols)] for k in top]))
    subs = list(dict.fromkeys(k for c in cols for k, v in metrics[c].items() if isinstance(v, dict) and k != "parse_errors"))
    for sub in subs:
        keys = rows_of(lambda d, sub=sub: d.get(sub) if isinstance(d.get(sub), dict) else {})
        parts.append(f"<h3>{_e(sub)}</h3>" + _table(["metric", *cols], [
            [k, *(format_value((metrics[c].get(sub) or {}).get(k)) if isinstance(metrics[c].get(sub), dict) else "-" for c in cols)] for k in keys]))
    reasons = rows_of(lambda d: d.get("parse_errors") if isinstance(d.get("parse_errors"), dict) else {})
    if reasons:
        parts.append("<h3>parse errors (rejected fragments)</h3>" + _table(["reason", *cols], [
            [r, *(format_value((metrics[c].get("parse_errors") or {}).get(r, 0)) for c in cols)] for r in reasons]))
    return "\n".join(parts)


def _calibration_html(cal: dict[str, dict], images: list[str]) -> str:
    """ECE per column and the reliability diagram (calibration.png)."""
    rows = [[c, format_value(v["ece"]), v["n"], sum(1 for b in v["bins"] if b["count"])] for c, v in cal.items()]
    return ("<h2>Calibration</h2><p>Per-object confidence vs correctness, in equal-width confidence bins; "
            "ECE = sum over bins of (bin share) x |accuracy - mean confidence|.</p>"
            + _table(["column", "ECE", "predictions", "non-empty bins"], rows)
            + _img("calibration.png", "reliability diagram", images))


def _run_html(run: dict) -> str:
    keys = ("name", "checkpoint", "final_step", "split", "data", "seconds_to_checkpoint", "seconds_total")
    rows = [[k, format_value(run[k])] for k in keys if k in run]
    out = _table(["run", ""], rows, numeric_from=2) if rows else ""
    if run.get("data_counts"):
        out += f"<details><summary>data counts</summary><pre>{_e(json.dumps(run['data_counts'], indent=2))}</pre></details>"
    if run.get("config"):
        out += f"<details><summary>config</summary><pre>{_e(json.dumps(run['config'], indent=2))}</pre></details>"
    return out


def _hist_row(name: str, h: dict, fmt: str = "{:+.3f}") -> list:
    if not h.get("n"):
        return [name, 0, "-", "-", "-"]
    return [name, h["n"], fmt.format(h["mean"]), fmt.format(h["median"]), f"{h['std']:.3f}"]


def _img(name: str, alt: str, images: list[str]) -> str:
    return f'<p><img class="fig" src="{_e(name)}" alt="{_e(alt)}"></p>' if name in images else ""


def page(rep: dict, metrics: dict | None) -> str:
    """The whole index.html of report ``rep`` (report.json's content) and metrics.json."""
    images = rep["images"]
    e = rep["errors"]
    p = []
    p.append(f"<h1>raytrain report: {_e(rep['name'])}</h1>")
    p.append(f'<p class="meta">run <code>{_e(rep["run"])}</code> &middot; data <code>{_e(rep["data"])}</code> &middot; '
             f"split <b>{_e(rep['split'])}</b> &middot; {rep['n_predictions']} predictions</p>")
    if rep["notes"]:
        p.append('<div class="notes"><b>Notes</b><ul>' + "".join(f"<li>{_e(n)}</li>" for n in rep["notes"]) + "</ul></div>")

    p.append("<h2>Metrics</h2>")
    if metrics:
        p.append("<p>Pointing distances in source pixels; boxes at IoU 0.5. "
                 "<i>untrained</i> is the base model, <i>centre_baseline</i> a blind guess (image centre / mean-size centred box).</p>")
        p.append(_metrics_html(metrics, rep.get("summary") or ()))
        if isinstance(metrics.get("run"), dict):
            p.append(_run_html(metrics["run"]))
    else:
        p.append("<p>No metrics (eval/metrics.json missing).</p>")

    if rep.get("calibration"):
        p.append(_calibration_html(rep["calibration"], images))

    p.append("<h2>Training curves</h2>")
    c = rep["curves"]
    if "curves.png" in images:
        p.append(_img("curves.png", "training curves", images))
        p.append(f"<p>{c['rows']} training reports.</p>")
        if c["restarts"]:
            p.append("<p>Restarts (dashed lines): " + ", ".join(
                f"step {format_value(r['step'])} (resumed from {_e(r['resumed_from'])})" for r in c["restarts"]) + ".</p>")
    else:
        p.append("<p>No training history to plot.</p>")

    p.append("<h2>Errors</h2>")
    o = e["outputs"]
    if o.get("total"):
        p.append(_table(["outputs (trained model)", "count"], [
            ["total", o.get("total", 0)],
            ["with at least one rejected fragment", o.get("with_errors", 0)],
            ["no object parsed (invalid)", o.get("no_object_parsed", 0)],
            ["truncated_object fragments", e["truncations"]["truncated_object"]],
            ["outputs cut off (truncated_object)", e["truncations"]["outputs"]],
            ["duplicate objects (same bins / IoU > 0.9 within one output)", e["duplicates"]["objects"]],
            ["outputs with duplicates", e["duplicates"]["outputs"]],
        ]))
    p.append(_img("errors.png", "parse failures by reason", images) or "<p>No parse failures.</p>")
    if e["samples"]:
        rows = [[r, s["task"], s["query"], s["fragment"], s["text"]] for r, ss in e["samples"].items() for s in ss]
        p.append("<details><summary>examples of rejected fragments</summary>" + _table(["reason", "task", "query", "fragment", "output"], rows, numeric_from=99) + "</details>")

    p.append("<h2>Localisation error</h2>")
    for key, title, fig in (("points", "points (closest prediction to each GT point)", "bias_points.png"),
                            ("box_centres", "box centres (one-to-one matched, overlapping pairs)", "bias_boxes.png")):
        b = rep["bias"][key]
        p.append(f"<h3>Bias: {title}</h3>")
        if b.get("n"):
            p.append(_table(["pred - GT", "n", "mean", "median", "std"], [
                _hist_row("dx (px)", b["dx_px"]), _hist_row("dy (px)", b["dy_px"]),
                _hist_row("dx (fraction of width)", b["dx_norm"], "{:+.4f}"), _hist_row("dy (fraction of height)", b["dy_norm"], "{:+.4f}")]))
            p.append(_img(fig, f"bias {key}", images))
        else:
            p.append(f"<p>No matched {key.replace('_', ' ')} (no such task, no ground truth, or no valid prediction).</p>")
    p.append("<h3>Distance error (points)</h3>")
    p.append(_img("distance.png", "distance error histogram", images) or "<p>No valid point predictions with a distance.</p>")

    p.append("<h2>Examples</h2>")
    p.append(f'<p class="legend"><span style="color:rgb{GT_COLOUR}">&#9711; ground truth (blue circle / box)</span>'
             f'<span style="color:rgb{PRED_COLOUR}">&#10005; prediction (red cross / box)</span>'
             "<br>Best, median and worst examples of each task, ranked by per-sample score "
             "(points: normalised distance; boxes: per-sample F1, then IoU; unparsable outputs rank last).</p>")
    if not rep["overlays"]:
        p.append("<p>No overlays (no predictions, no images, or max_overlays=0).</p>")
    by_task: dict[str, list[dict]] = {}
    for r in rep["overlays"]:
        by_task.setdefault(r["task"], []).append(r)
    for task, recs in by_task.items():
        p.append(f"<h3>{_e(task)}</h3>")
        for cat in ("best", "median", "worst"):
            figs = [r for r in recs if r["category"] == cat]
            if not figs:
                continue
            p.append(f"<h4>{cat}</h4><div class=\"grid\">")
            for r in figs:
                errs = "".join(f"<br>{_e(a)}: <code>{_e(b)}</code>" for a, b in r["errors"])
                p.append(f'<figure><img src="{_e(r["file"])}" alt="{_e(r["id"])}"><figcaption>{r["rank"]} of {r["of"]}: '
                         f'<b>{_e(r["query"])}</b> &middot; {_e(r["summary"])}<br>id {_e(r["id"])}<br>'
                         f"output: <code>{_e(r['text'])}</code>{errs}</figcaption></figure>")
            p.append("</div>")
    body = "\n".join(p)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>raytrain report: {_e(rep["name"])}</title>'
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")
