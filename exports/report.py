"""Render a parity report (the dict of :meth:`exports.parity.ParityReport.to_dict`) as Markdown or HTML.

The HTML page is self-contained: CSS and the plots (inline SVG drawn by matplotlib) are in the
file, nothing is fetched. It is also well-formed XML, so ``xml.etree`` can check it. Both
renderers read only the JSON-able dict, so a saved ``parity.json`` renders again later::

    from exports.report import render_html
    Path("parity.html").write_text(render_html(json.loads(Path("parity.json").read_text())))
"""

from __future__ import annotations

import math
import re
from html import escape
from typing import Any, Callable, Mapping, Sequence

from clipcore.proportions import wilson_interval
from exports.cpu_int8 import saturates
from exports.flips import FLIPS_CSS, flips_html, flips_markdown
from exports.svg import figure_svg

Report = Mapping[str, Any]
STATUS_COLOURS = {"reference": "#4c72b0", "kept": "#2a9d4b", "rejected": "#d1342f", "error": "#8c564b",
                  "skipped": "#999999"}
RUNTIME_MARKERS = {"torch": "o", "onnxruntime-cpu": "s", "onnxruntime-cuda": "^", "onnxruntime-tensorrt": "v",
                   "tensorrt": "D"}


PERCENT_METRICS = {"agreement_student", "agreement_teacher", "top1", "top5", "top1_drop"}


def format_metric(metric: str, value: float | None) -> str:
    """A metric value for people: percentages for accuracy-like metrics, 3 significant digits else."""
    if value is None:
        return "-"
    if metric in PERCENT_METRICS:
        return f"{100 * value:.2f} %"
    return f"{value:.3g}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _num(fmt: str) -> Callable[[float | None], str]:
    return lambda v: "-" if v is None else format(v, fmt)


def _metric(key: str, fmt: Callable[[float | None], str]) -> Callable[[Mapping[str, Any]], str]:
    return lambda s: fmt(s.get("metrics", {}).get(key))


def _latency(key: str, fmt: Callable[[float | None], str]) -> Callable[[Mapping[str, Any]], str]:
    return lambda s: fmt(s.get("latency", {}).get(key))


# (header, cell) for every column of the subjects table, shared by Markdown and HTML
COLUMNS: list[tuple[str, Callable[[Mapping[str, Any]], str]]] = [
    ("subject", lambda s: s["name"]),
    ("runtime", lambda s: s["runtime"]),
    ("precision", lambda s: s["precision"]),
    ("status", lambda s: s["status"]),
    ("top-1 %", _metric("top1", _pct)),
    ("top-5 %", _metric("top5", _pct)),
    ("agree student %", _metric("agreement_student", _pct)),
    ("agree teacher %", _metric("agreement_teacher", _pct)),
    ("KL(student‖·)", _metric("kl_student", _num(".2e"))),
    ("KL(teacher‖·)", _metric("kl_teacher", _num(".3f"))),
    ("cos min", _metric("emb_cos_min", _num(".6f"))),
    ("cos mean", _metric("emb_cos_mean", _num(".6f"))),
    ("max |Δemb|", _metric("emb_max_abs_diff", _num(".2e"))),
    ("p50 ms (b1)", _latency("p50_ms", _num(".2f"))),
    ("p95 ms (b1)", _latency("p95_ms", _num(".2f"))),
    ("img/s (b32)", _latency("throughput_ips", _num(".1f"))),
    ("size MB", lambda s: _num(".2f")(s.get("size_mb"))),
    ("params M", lambda s: _num(".3f")(None if s.get("params") is None else s["params"] / 1e6)),
]


def _throughput_header(report: Report) -> str:
    return f"img/s (b{report.get('settings', {}).get('throughput_batch', 32)})"


def _headers(report: Report) -> list[str]:
    return [_throughput_header(report) if h == "img/s (b32)" else h for h, _ in COLUMNS]


def verdict(report: Report) -> str:
    n = len(report.get("failures", []))
    return "PASSED" if report.get("passed") else f"FAILED ({n} gate failure{'s' if n != 1 else ''})"


def title(report: Report) -> str:
    return f"Parity report: {report['student']['name']} vs teacher {report['teacher']['name']}"


def data_line(report: Report) -> str:
    d = report["data"]
    split = f"[{d['split']}]" if d.get("split") else ""
    failed = f", {d['num_failed']} undecodable skipped" if d.get("num_failed") else ""
    return f"{d['path']}{split}: {d['num_images']} images{failed}, {d['num_classes']} classes, prompt templates: {len(d['templates'])}"


# ----------------------------------------------------------------------------- Markdown


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def subjects_table(report: Report) -> str:
    """The subjects as a Markdown table (also what the CLI prints)."""
    headers = _headers(report)
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    for s in report["subjects"]:
        lines.append("| " + " | ".join(_md_cell(cell(s)) for _, cell in COLUMNS) + " |")
    return "\n".join(lines)


# proportions of the report's images: their 95 % interval says how far the gate's reading can move
PROPORTION_METRICS = {"agreement_student", "agreement_teacher"}


def interval_cell(metric: str, value: float | None, n: int | None) -> str:
    """``95.2–97.5 %``: the Wilson interval of an agreement over the report's ``n`` images; "-" else."""
    if metric not in PROPORTION_METRICS or value is None or not n or not 0 <= value <= 1:
        return "-"
    lo, hi = wilson_interval(value, n)
    return f"{100 * lo:.2f}–{100 * hi:.2f} %"


def gate_rows(report: Report) -> list[list[str]]:
    """One row per gate check: variant, gate, field, metric value, its 95 % interval, threshold, pass/FAIL."""
    n = report.get("data", {}).get("num_images")
    rows = []
    for s in report["subjects"]:
        for c in s.get("checks", []):
            rows.append([s["name"], s.get("gate") or "-", f"{c['field']} ({c['metric']} {c['op']})",
                         format_metric(c["metric"], c["value"]), interval_cell(c["metric"], c["value"], n),
                         format_metric(c["metric"], c["threshold"]), "pass" if c["passed"] else "FAIL"])
    return rows


GATE_HEADERS = ["variant", "gate", "check", "value", "95 % interval", "threshold", "result"]


def notes(report: Report) -> list[str]:
    """Skipped, failed and unchecked subjects, one line each; a hint when int8 failed on a CPU whose
    int8 kernels saturate."""
    lines = [f"{s['name']}: {s['reason']}" for s in report["subjects"] if s.get("reason")]
    dot = report.get("environment", {}).get("cpu_int8_dot") or ""
    int8_rejected = [s["name"] for s in report["subjects"]
                     if str(s.get("precision", "")).startswith("int8") and s.get("status") == "rejected"]
    if int8_rejected and saturates(dot):
        lines.append(f"{', '.join(int8_rejected)}: this CPU has no VNNI, so onnxruntime's u8s8 int8 kernels may "
                     "saturate here and not on the device; `python benchmarks/int8_placement.py --rows "
                     "default,float-kernels` tells the two apart (docs/edge-bundle.md)")
    return lines


def setup_items(report: Report) -> list[tuple[str, str]]:
    env, st, stu = report["environment"], report["settings"], report["student"]
    providers = env.get("providers", {})
    return [
        ("teacher", f"{report['teacher']['name']} (fingerprint {report['teacher']['fingerprint']})"),
        ("student", f"{stu['name']} (fingerprint {stu['fingerprint']}, embed dim {stu['embed_dim']})"),
        *([("agreement measured against", f"{ref['name']} (fingerprint {ref['fingerprint']}): the torch model the "
                                          "exported files replace, not the student they were exported from")]
          if (ref := stu.get("agreement_reference")) else []),
        ("variants' class embeddings", f"{stu['variant_class_embeddings']}; max |Δ| vs torch student head "
                                       f"{_num('.2e')(stu['variant_head_max_abs_diff'])}"),
        ("data", data_line(report)),
        ("int8-static calibration", report["data"].get("calibration") or "-"),
        ("device", f"{env['device']}: {env.get('gpu') or env['cpu']} ({env['cpu_count']} CPU cores visible)"),
        ("CPU int8 dot product", env.get("cpu_int8_dot") or "not recorded"),
        ("threads", f"{st['threads'] or 'library default'} (torch uses {env['torch_threads']})"),
        ("latency", f"batch 1: {st['warmup']} warm-up + {st['iters']} timed runs (p50/p95); throughput: "
                    f"{st['throughput_iters']} timed runs at batch {st['throughput_batch']} after 1 warm-up; "
                    "random pixels, numpy in to numpy out"),
        ("software", f"torch {env['torch']}, onnxruntime {env['onnxruntime']} "
                     f"(providers: {', '.join(providers.get('ort_providers', []))}), "
                     f"TensorRT {providers.get('tensorrt_version') or 'not installed'}, python {env['python']}"),
        ("created", report["created"]),
    ]


def render_markdown(report: Report) -> str:
    out = [f"# {title(report)}", "", f"**{verdict(report)}**. {data_line(report)}.", "", "## Subjects", "",
           subjects_table(report), ""]
    rows = gate_rows(report)
    if rows:
        out += ["## Gates (against the torch student)", "", "| " + " | ".join(GATE_HEADERS) + " |",
                "|" + "---|" * len(GATE_HEADERS)]
        out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows] + [""]
    if report.get("failures"):
        out += ["## Failures", ""] + [f"- {f}" for f in report["failures"]] + [""]
    if notes(report):
        out += ["## Notes", ""] + [f"- {n}" for n in notes(report)] + [""]
    out += flips_markdown(report)
    out += ["## Setup", ""] + [f"- **{k}**: {v}" for k, v in setup_items(report)] + [""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots


def _figure(width: float = 7.0, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _measured(report: Report, metric: str = "top1") -> list[Mapping[str, Any]]:
    """Subjects with latency and a value for ``metric`` (None where the outputs were not finite)."""
    return [s for s in report["subjects"]
            if s.get("latency") and s.get("metrics", {}).get(metric) is not None]


def accuracy_latency_svg(report: Report) -> str:
    """Top-1 accuracy against batch-1 p50 latency, one labelled point per measured subject."""
    subjects = sorted(_measured(report), key=lambda s: s["latency"]["p50_ms"])
    xs = [s["latency"]["p50_ms"] for s in subjects]
    ys = [100 * s["metrics"]["top1"] for s in subjects]
    log_x = bool(xs) and max(xs) / max(min(xs), 1e-9) > 20
    fig, ax = _figure()
    for s, x, y, level in zip(subjects, xs, ys, _label_levels(xs, ys, log_x)):
        ax.scatter([x], [y], s=70, marker=RUNTIME_MARKERS.get(s["runtime"], "o"),
                   color=STATUS_COLOURS.get(s["status"], "#333333"), edgecolor="black", linewidth=0.5, zorder=3)
        ax.annotate(s["name"], (x, y), textcoords="offset points", xytext=(7, 3 - 11 * level), fontsize=8)
    if log_x:
        ax.set_xscale("log")
    ax.margins(x=0.1, y=0.15)  # room for the labels of the outermost points
    ax.set_xlabel("latency at batch 1, p50 (ms)")
    ax.set_ylabel("zero-shot top-1 accuracy (%)")
    ax.set_title("Accuracy vs latency")
    ax.grid(True, alpha=0.3)
    _status_legend(ax, {s["status"] for s in subjects})
    return figure_svg(fig)


def _label_levels(xs: Sequence[float], ys: Sequence[float], log_x: bool) -> list[int]:
    """How many lines to shift each label down so that labels of nearby points do not overlap."""
    fx = [math.log10(max(x, 1e-9)) for x in xs] if log_x else list(xs)
    span_x = (max(fx) - min(fx)) or 1.0 if fx else 1.0
    span_y = (max(ys) - min(ys)) or 1.0 if ys else 1.0
    levels: list[int] = []
    for i in range(len(fx)):
        near = [levels[j] for j in range(i) if abs(fx[i] - fx[j]) < 0.15 * span_x and abs(ys[i] - ys[j]) < 0.08 * span_y]
        levels.append(next(k for k in range(len(near) + 1) if k not in near))
    return levels


def _status_legend(ax, statuses: set[str]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=k) for k, c in STATUS_COLOURS.items() if k in statuses]
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best")


def agreement_svg(report: Report) -> str:
    """Per variant: top-1 agreement with the torch student and with the teacher, and the gate."""
    variants = [s for s in report["subjects"] if s["role"] == "variant"
                and None not in (s.get("metrics", {}).get("agreement_student"), s.get("metrics", {}).get("agreement_teacher"))]
    fig, ax = _figure(max(5.0, 1.2 * len(variants) + 2), 4.2)
    if not variants:
        ax.text(0.5, 0.5, "no variant was measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return figure_svg(fig)
    xs = range(len(variants))
    student = [100 * s["metrics"]["agreement_student"] for s in variants]
    teacher = [100 * s["metrics"]["agreement_teacher"] for s in variants]
    ax.bar([x - 0.2 for x in xs], student, width=0.4, label="vs torch student",
           color=[STATUS_COLOURS.get(s["status"], "#333333") for s in variants])
    ax.bar([x + 0.2 for x in xs], teacher, width=0.4, label="vs teacher", color="#bbbbbb")
    thresholds = _gate_thresholds(report, variants)
    for x, t in zip(xs, thresholds):
        if t is not None:
            ax.hlines(t, x - 0.45, x + 0.05, colors="black", linestyles="dashed", linewidth=1.2, zorder=4)
    for x, v in zip(xs, student):
        ax.annotate(f"{v:.1f}", (x - 0.2, v), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
    floor = min(student + teacher + [t for t in thresholds if t is not None])
    ax.set_ylim(max(0.0, floor - max(2.0, 0.1 * (100 - floor))), 100.8)
    ax.set_xticks(list(xs), [s["name"] for s in variants], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("top-1 agreement (%)")
    ax.set_title("Agreement per variant (dashed: gate minimum)")
    # outside the axes: inside, it hides the bars of the first or last variant
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    return figure_svg(fig)


def _gate_thresholds(report: Report, variants: Sequence[Mapping[str, Any]]) -> list[float | None]:
    out = []
    for s in variants:
        check = next((c for c in s.get("checks", []) if c["field"] == "min_agreement"), None)
        out.append(None if check is None else 100 * check["threshold"])
    return out


def plots(report: Report) -> list[tuple[str, str]]:
    """``[(caption, svg)]``; empty when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    return [
        ("Zero-shot top-1 accuracy against batch-1 latency. Colour: status; marker: runtime "
         "(circle torch, square onnxruntime CPU, triangles onnxruntime GPU, diamond TensorRT).",
         accuracy_latency_svg(report)),
        ("Top-1 agreement of each variant with the torch student (coloured by status) and with the teacher (grey).",
         agreement_svg(report)),
    ]


# ----------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f2f2f2; }
td.text { text-align: left; }
.verdict { display: inline-block; padding: 4px 12px; border-radius: 4px; color: white; font-weight: bold; }
.pass { background: #2a9d4b; } .fail { background: #d1342f; }
.plots { display: flex; flex-wrap: wrap; gap: 2em; }
figure { margin: 0; max-width: 640px; } figure svg { width: 100%; height: auto; }
figcaption { font-size: 12px; color: #555; }
tr.rejected td, tr.error td, td.FAIL { background: #fde4e3; }
tr.skipped td { color: #888; }
dt { font-weight: bold; } dd { margin: 0 0 0.5em 1.5em; }
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], row_classes: Sequence[str] = (),
           text_columns: int = 1) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{escape(row_classes[i])}"' if i < len(row_classes) else ""
        cells = "".join(f"<td{_cell_class(j < text_columns, c)}>{escape(c)}</td>" for j, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _cell_class(is_text: bool, content: str) -> str:
    if is_text:
        return ' class="text"'
    return ' class="FAIL"' if content == "FAIL" else ""


def render_html(report: Report) -> str:
    subjects = report["subjects"]
    parts = [
        "<!DOCTYPE html>",
        '<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head><meta charset="utf-8" />',
        f"<title>{escape(title(report))}</title><style>{_CSS}{FLIPS_CSS}</style></head><body>",
        f"<h1>{escape(title(report))}</h1>",
        f'<p><span class="verdict {"pass" if report.get("passed") else "fail"}">{escape(verdict(report))}</span> '
        f"{escape(data_line(report))}</p>",
    ]
    figures = plots(report)
    if figures:
        parts.append('<div class="plots">' + "".join(
            f"<figure>{namespace_ids(svg, f'plot{i}-')}<figcaption>{escape(caption)}</figcaption></figure>"
            for i, (caption, svg) in enumerate(figures, 1)) + "</div>")
    else:
        parts.append("<p>(plots need matplotlib, which is not installed)</p>")
    parts += ["<h2>Subjects</h2>", _table(_headers(report), [[cell(s) for _, cell in COLUMNS] for s in subjects],
                                          [s["status"] for s in subjects], text_columns=4)]
    rows = gate_rows(report)
    if rows:
        parts += ["<h2>Gates (against the torch student)</h2>", _table(GATE_HEADERS, rows, text_columns=3)]
    if report.get("failures"):
        parts += ["<h2>Failures</h2><ul>"] + [f"<li>{escape(f)}</li>" for f in report["failures"]] + ["</ul>"]
    if notes(report):
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{escape(n)}</li>" for n in notes(report)] + ["</ul>"]
    parts += [namespace_ids(p, "flips-") if p.startswith('<div class="plots">') else p
              for p in flips_html(report, _table)]
    parts += ["<h2>Setup</h2><dl>"] + [f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in setup_items(report)]
    parts += ["</dl></body></html>"]
    return _strip_svg_comments("\n".join(parts)) + "\n"


_ID_REF = re.compile(r'(\bid="|href="#|url\(#)([^")]+)')


def namespace_ids(svg: str, prefix: str) -> str:
    """Prefix every id in ``svg`` and every reference to one (``href="#id"``, ``url(#id)``).

    matplotlib numbers its element ids per figure (``figure_1``, ``patch_1``, ...), so two inline
    plots would repeat them; ids are global in an HTML page, and a repeated clip-path id can clip
    the second plot with the first one's rectangle.
    """
    ids = set(re.findall(r'\bid="([^"]+)"', svg))
    return _ID_REF.sub(lambda m: m.group(1) + (prefix + m.group(2) if m.group(2) in ids else m.group(2)), svg)


def _strip_svg_comments(html: str) -> str:
    # matplotlib's "Created with matplotlib" comments are noise in an inline page
    return re.sub(r"<!--.*?-->", "", html, flags=re.S)
