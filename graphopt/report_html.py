"""The ``graphopt compress`` report as one self-contained HTML page.

Everything the page shows comes from the report dict (``report.json``), so
``graphopt report RUN.json -o DIR`` draws the same page later.  Charts are
matplotlib SVGs embedded as ``data:`` URIs: the page needs no network and no
other file.  Section ids (``SECTIONS``) are stable for tools and tests.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any, Mapping, Sequence

from graphopt.fidelity import METRICS

SECTIONS = ("summary", "chosen", "candidates", "channels", "macs", "sensitivity", "untouched")
_MAX_BARS = 60  # beyond: the layers that changed most (then the largest) are drawn

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;
color:#222;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0;font-size:.92em}td,th{border:1px solid #ddd;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.chosen td{background:#e8f5e9;font-weight:600}.met{color:#1b5e20}.miss{color:#b71c1c}
.banner{padding:10px 14px;border-radius:6px;margin:12px 0}.ok{background:#e8f5e9}.bad{background:#fff3e0}
pre{background:#f6f8fa;padding:10px;overflow-x:auto;font-size:.88em}code{font-size:.92em}
img.chart{max-width:100%;height:auto;display:block;margin:8px 0}p.empty{color:#666;font-style:italic}
"""


def render(report: Mapping[str, Any]) -> str:
    """The page for one compress report."""
    e = html.escape
    title = f"graphopt compress: {report.get('input', '')}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<div class="banner {"ok" if report.get("met") else "bad"}">{e(str(report.get("message", "")))}</div>',
        _summary(report),
        _chosen(report),
        _candidates(report),
        _layers(report, "channels", "Channels kept per layer", "channels", "output channels"),
        _layers(report, "macs", "MACs per layer, before and after", "macs", "MACs"),
        _sensitivity(report),
        _untouched(report),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------
def _section(sid: str, heading: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(heading)}</h2>\n{body}\n</section>'


def _num(v: Any, unit: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return html.escape(v)
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.4g}{unit}"
    n = float(v)
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}{unit}"
    return f"{int(n)}{unit}"


def _bytes(v: Any) -> str:
    if v is None:
        return "–"
    n = float(v)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{v} B"


def _ratio(before: Any, after: Any) -> str:
    try:
        return f"{float(after) / float(before):.2f}x" if before else "–"
    except (TypeError, ValueError):
        return "–"


def _summary(report: Mapping[str, Any]) -> str:
    m = report.get("model", {})
    b, s, a = m.get("before", {}), m.get("simplified", {}), m.get("after", {})
    lat, fid, opts = report.get("latency", {}), report.get("fidelity", {}), report.get("options", {})
    rows = [("File size", _bytes(b.get("file_bytes")), _bytes(s.get("file_bytes")), _bytes(a.get("file_bytes")),
             _ratio(b.get("file_bytes"), a.get("file_bytes")))]
    for key, label in (("nodes", "Nodes"), ("params", "Parameters"), ("macs", "MACs (float ops counted)")):
        rows.append((label, _num(b.get(key)), _num(s.get(key)), _num(a.get(key)), _ratio(b.get(key), a.get(key))))
    rows.append((f"Latency, {lat.get('threads', '?')} thread(s)", "", _num(lat.get("baseline_ms"), " ms"),
                 _num(lat.get("after_ms"), " ms"), f"{lat['ratio']:.2f}x" if isinstance(lat.get("ratio"), float)
                 else "–"))
    body = ["<table><tr><th></th><th>input</th><th>simplified (float)</th><th>output</th><th>output / input</th></tr>"]
    for row in rows:
        body.append("<tr><th>" + html.escape(row[0]) + "</th>" + "".join(f'<td class="num">{c}</td>' for c in row[1:])
                    + "</tr>")
    body.append("</table>")
    symbolic = b.get("symbolic_dims_as_1") or []
    if symbolic:
        body.append(f"<p>MACs count the dynamic dimension(s) {html.escape(', '.join(map(str, symbolic)))} as 1 "
                    "(pin them with <code>--input-shape</code>).</p>")
    data = report.get("data", {})
    metrics = ", ".join(f"{k} {_num(v)}" for k, v in fid.items() if k not in ("target", "samples"))
    body.append(f"<p>Fidelity target <code>{html.escape(str(opts.get('fidelity', '')))}</code> on "
                f"{data.get('heldout', '?')} held-out sample(s) (calibration used {data.get('calibration', '?')} of "
                f"{data.get('samples', '?')} from <code>{html.escape(str(data.get('source', '')))}</code>): "
                f"{html.escape(metrics)}. Objective: {html.escape(str(opts.get('objective', '')))}; "
                f"latency measured with {html.escape(str(lat.get('measured_on', 'onnxruntime')))}.</p>")
    budget = report.get("budget", {})
    body.append(f"<p>Search time {budget.get('seconds_spent', 0):.1f} s"
                + (f" of a {budget['minutes']:g} min budget" if budget.get("minutes") else "")
                + ("; the budget ended the search early" if budget.get("stopped_early") else "")
                + ("; interrupted (best result so far kept)" if report.get("interrupted") else "") + ".</p>")
    comp = report.get("compile")
    if comp:
        state = f"artifact <code>{html.escape(str(comp.get('artifact')))}</code>" if comp.get("ok") else \
            html.escape(str(comp.get("error")))
        body.append(f"<p>Compiled with {html.escape(str(comp.get('backend')))} for "
                    f"{html.escape(str(comp.get('target')))}: {state}</p>")
    return _section("summary", "Summary", "\n".join(body))


def _chosen(report: Mapping[str, Any]) -> str:
    ch = report.get("chosen", {})
    body = [f"<p>Pipeline: <code>{html.escape(str(ch.get('pipeline', '')))}</code></p>"]
    if ch.get("rebuild"):
        body.append(f"<p>Rebuild: <code>{html.escape(ch['rebuild'])}</code></p>")
    if ch.get("toml"):
        body.append(f"<pre>{html.escape(ch['toml'])}</pre>")
    return _section("chosen", "Chosen pipeline", "\n".join(body))


def _candidates(report: Mapping[str, Any]) -> str:
    cands = report.get("candidates", [])
    chosen = (report.get("chosen") or {}).get("candidate")
    target = str(report.get("options", {}).get("fidelity", ""))
    metric = _primary_metric(target)
    body = []
    pts = [c for c in cands if c.get("status") == "ok" and c.get("latency_ratio") is not None
           and isinstance(c.get("fidelity", {}).get(metric), (int, float))]
    if pts:
        body.append(_img(_scatter(pts, chosen, metric, target), "candidates: latency vs fidelity"))
    else:
        body.append('<p class="empty">No candidate has both a latency and a fidelity to plot.</p>')
    body.append("<table><tr><th>#</th><th>pipeline</th><th>status</th><th>fidelity</th><th>target</th>"
                "<th>latency</th><th>vs float</th><th>size</th><th>time</th></tr>")
    for c in cands:
        fid = c.get("fidelity") or {}
        cls = ' class="chosen"' if c.get("pipeline") == chosen and c.get("status") == "ok" else ""
        met = ('<span class="met">met</span>' if c.get("met") else '<span class="miss">missed</span>') \
            if c.get("status") == "ok" else ""
        status = html.escape(c.get("status", "")) + (f": {html.escape(c['error'])}" if c.get("error") else "")
        fid_text = ", ".join(f"{k} {_num(v)}" for k, v in fid.items()
                             if k in ("cosine", "top1", "max-abs") or k not in METRICS)  # and task metrics
        body.append(
            f"<tr{cls}><td>{c.get('index')}</td><td><code>{html.escape(c.get('pipeline', ''))}</code></td>"
            f"<td>{status}</td><td>{html.escape(fid_text)}</td><td>{met}</td>"
            f'<td class="num">{_num(c.get("latency_ms"), " ms")}</td>'
            f'<td class="num">{_num(c.get("latency_ratio"))}</td><td class="num">{_bytes(c.get("size_bytes"))}</td>'
            f'<td class="num">{_num(c.get("seconds"), " s")}</td></tr>')
    body.append("</table>")
    return _section("candidates", "Candidates: latency vs fidelity", "\n".join(body))


def _layers(report: Mapping[str, Any], sid: str, heading: str, key: str, label: str) -> str:
    layers = [dict(x) for x in report.get("layers", [])]
    if not layers:
        return _section(sid, heading,
                        '<p class="empty">The model has no Conv, Gemm or MatMul with constant weights.</p>')
    note = ""
    changed = sum(1 for x in layers if x[f"{key}_after"] != x[f"{key}_before"])
    total = len(layers)
    if len(layers) > _MAX_BARS:
        ranked = sorted(range(len(layers)), key=lambda i: (-(layers[i][f"{key}_before"] - layers[i][f"{key}_after"]),
                                                           -layers[i][f"{key}_before"], i))
        keep = sorted(ranked[:_MAX_BARS])
        note = f"<p>{_MAX_BARS} of {len(layers)} layers shown: those that changed most, then the largest.</p>"
        layers = [layers[i] for i in keep]
    text = f"<p>{changed} of {total} layer(s) changed.</p>{note}"
    return _section(sid, heading, text + _img(_bars(layers, key, label), heading))


def _sensitivity(report: Mapping[str, Any]) -> str:
    sens = report.get("sensitivity") or []
    if not sens:
        return _section("sensitivity", "Quantization sensitivity",
                        '<p class="empty">No quantization pass ranked nodes (no fidelity budget in the chosen '
                        'pipeline or nothing to rank).</p>')
    body = ["<p>Score: how far quantizing only that node moves the outputs, relative to what the target allows "
            "(from the quantization pass's own ranking on calibration samples"
            + (f", in candidate <code>{html.escape(str(report['sensitivity_from']))}</code>"
               if report.get("sensitivity_from") else "") + ").</p>",
            _img(_sensitivity_chart(sens), "quantization sensitivity")]
    return _section("sensitivity", "Quantization sensitivity", "\n".join(body))


def _untouched(report: Mapping[str, Any]) -> str:
    items = report.get("untouched") or []
    if not items:
        return _section("untouched", "Nodes left untouched", '<p class="empty">The passes left nothing alone.</p>')
    rows = ["<table><tr><th>pass</th><th>node(s)</th><th>reason</th></tr>"]
    for it in items:
        rows.append(f"<tr><td>{html.escape(str(it.get('pass', '')))}</td>"
                    f"<td><code>{html.escape(str(it.get('node', '')))}</code></td>"
                    f"<td>{html.escape(str(it.get('reason', '')))}</td></tr>")
    rows.append("</table>")
    table = "\n".join(rows)
    if len(items) > 40:  # a long list stays one click away instead of burying the page end
        table = f"<details><summary>{len(items)} entries</summary>\n{table}\n</details>"
    return _section("untouched", "Nodes left untouched", table)


# ----------------------------------------------------------------------------------
# Charts
# ----------------------------------------------------------------------------------
def _primary_metric(target: str) -> str:
    name = target.split(",")[0]
    for op in (">=", "<=", ">", "<"):
        name = name.split(op)[0]
    return name.strip() or "cosine"


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "graphopt"  # stable ids: the same report gives the same page
    plt.rcParams["svg.fonttype"] = "none"
    return plt.subplots(figsize=(width, height))


def _svg(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return buf.getvalue()


def _img(svg: bytes, alt: str) -> str:
    data = base64.b64encode(svg).decode("ascii")
    return f'<img class="chart" alt="{html.escape(alt)}" src="data:image/svg+xml;base64,{data}">'


def _scatter(points: Sequence[Mapping[str, Any]], chosen: str | None, metric: str, target: str) -> bytes:
    fig, ax = _figure(9, 4.8)
    xs = [p["latency_ratio"] for p in points]
    ys = [p["fidelity"][metric] for p in points]
    colors = ["#2e7d32" if p.get("met") else "#c62828" for p in points]
    ax.scatter(xs, ys, c=colors, s=40, zorder=3)
    for p, x, y in zip(points, xs, ys):
        ax.annotate(str(p["index"]), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    best = [(x, y) for p, x, y in zip(points, xs, ys) if p["pipeline"] == chosen]
    if best:
        ax.scatter([best[0][0]], [best[0][1]], s=260, facecolors="none", edgecolors="#1565c0", linewidths=2,
                   zorder=4, label="chosen")
    ax.scatter([1.0], [1.0 if metric != "max-abs" else 0.0], marker="s", c="#555", s=40, zorder=3,
               label="float (simplified)")
    threshold = _threshold(target, metric)
    if threshold is not None:
        ax.axhline(threshold, color="#888", linestyle="--", linewidth=1, label=f"target {target}")
    ax.set_xlabel("latency vs float model (lower is faster)")
    ax.set_ylabel(f"{metric} on held-out samples")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _svg(fig)


def _threshold(target: str, metric: str) -> float | None:
    for item in target.split(","):
        if _primary_metric(item) == metric:
            for op in (">=", "<=", ">", "<"):
                if op in item:
                    try:
                        return float(item.split(op)[1])
                    except ValueError:
                        return None
    return None


def _bars(layers: Sequence[Mapping[str, Any]], key: str, label: str) -> bytes:
    import numpy as np

    n = len(layers)
    fig, ax = _figure(max(8.0, min(0.28 * n + 3, 16)), 4.6)
    x = np.arange(n)
    ax.bar(x - 0.2, [l[f"{key}_before"] for l in layers], 0.4, label="before", color="#90a4ae")
    ax.bar(x + 0.2, [l[f"{key}_after"] for l in layers], 0.4, label="after", color="#1e88e5")
    ax.set_xticks(x)
    ax.set_xticklabels([_short(l["name"]) for l in layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _svg(fig)


def _sensitivity_chart(sens: Sequence[Mapping[str, Any]]) -> bytes:
    import numpy as np

    items = list(sens)[:40]
    fig, ax = _figure(9, max(2.5, 0.26 * len(items) + 1.2))
    y = np.arange(len(items))
    scores = [float(s.get("score") or 0.0) for s in items]
    colors = ["#ef6c00" if s.get("kept_float") else "#5c6bc0" for s in items]
    ax.barh(y, scores, color=colors)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{_short(str(s.get('node')))} ({s.get('op')})" for s in items], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("sensitivity score (orange: kept in float)")
    ax.grid(True, axis="x", alpha=0.3)
    return _svg(fig)


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


__all__ = ["SECTIONS", "render"]
