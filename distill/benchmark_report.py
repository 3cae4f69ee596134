"""The zero-shot benchmark's report: ``benchmark.md`` and a self-contained ``benchmark.html`` from the
report dict that :mod:`distill.benchmark` measures (and writes as ``benchmark.json``).

The tables are built once (:func:`table_rows`, :func:`difference_rows`) and rendered as Markdown and
HTML; the page adds one SVG bar chart per dataset and needs no script or external file.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from clipcore import bootstrap


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _with_interval(x: float | None, interval: list[float] | None) -> str:
    """``69.6 % [57.1–82.1]``: a percentage and its 95 % interval, when there is one."""
    if x is None or not interval:
        return _pct(x)
    return f"{100 * x:.1f} % [{100 * interval[0]:.1f}–{100 * interval[1]:.1f}]"


def _label(row: dict) -> str:
    role = {"reference": " (reference)", "ceiling": " (ceiling)"}.get(row["role"], "")
    return row["model"] + role + (" (random init)" if row["random_init"] else "")


def _cos(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the results table, shared by Markdown and HTML: per dataset the score, and
    with a reference its retention and the mean cosine to the reference's embeddings; then the means
    over the datasets the reference scores at least twice chance on, raw and above chance."""
    names = [d["name"] for d in report["datasets"]]
    has_ref = report["reference"] is not None
    header = ["model", "GFLOPs (image)"]
    for d in report["datasets"]:
        header.append(f"{d['name']} {d['metric']}")
        if has_ref:
            header += ["% of ref.", "cos to ref."]
    if has_ref:
        header += ["mean % of ref.", "mean above-chance % of ref."]
    rows = []
    for row in report["models"]:
        cells = [_label(row), f"{row['image_gflops']:.3f}" if "image_gflops" in row else "—"]
        for name in names:
            result = row["results"][name]
            # with a reference the paired interval of the retention says it; without one, the score's
            cells.append(_pct(result["score"]) if has_ref else _with_interval(result["score"], result.get("score_interval")))
            if has_ref:  # the reference's own retention is 100 % by definition: no interval to show
                shown = None if row["role"] == "reference" else row.get("retention_interval", {}).get(name)
                cells += [_with_interval(row["retention"][name], shown),
                          _cos(result.get("cosine_to_reference"))]
        if has_ref:
            shown = None if row["role"] == "reference" else row.get("mean_retention_interval")
            cells += [_with_interval(row["mean_retention"], shown),
                      _pct(row["mean_above_chance_retention"])]
        rows.append(cells)
    return header, rows


def difference_rows(report: dict) -> tuple[list[str], list[list[str]]] | None:
    """Each model after the first against the first (``--model`` order): its score minus the first's in
    points, with the paired 95 % interval; None with fewer than two models."""
    models = [r for r in report["models"] if r["role"] == "model"]
    if len(models) < 2:
        return None
    names = [d["name"] for d in report["datasets"]]
    header = [f"model − {_label(models[0])}"] + [f"{n} (points)" for n in names]
    rows = []
    for row in models[1:]:
        cells = [_label(row)]
        for name in names:
            diff = 100 * (row["results"][name]["score"] - models[0]["results"][name]["score"])
            interval = row["difference_to_first_model"].get(name)
            cells.append(f"{diff:+.1f}" + ("" if not interval else
                                          f" [{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]"))
        rows.append(cells)
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows])


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def notes(report: dict) -> list[str]:
    """What a reader must know to read the means: the datasets they leave out, and why."""
    out = [f"{d['name']} is left out of the means: {d['left_out']}." for d in report["datasets"] if d.get("left_out")]
    what = "retention" if report["reference"] is not None else "score"
    out.append(f"[lo–hi]: the 95 % bootstrap interval of the {what} ({bootstrap.RESAMPLES} resamples of the images "
               "or captions, the same resamples for every model" + (", each model paired with the reference on them"
                                                                      if what == "retention" else "") +
               "); compare two models by their paired difference, not by whether these intervals overlap.")
    if report["reference"] is not None:
        out.append("Above-chance retention is (score − chance) ÷ (reference − chance); chance per dataset is in the "
                   "table below. cos to ref.: the mean cosine between a model's image embedding and the reference's "
                   "of the same image.")
    return out


def to_markdown(report: dict) -> str:
    lines = [f"# Zero-shot benchmark: `{report['suite']}`", ""] + _md_table(*table_rows(report))
    lines += [""] + notes(report)
    differences = difference_rows(report)
    if differences:
        lines += ["", "Paired differences (the same images or captions; [lo, hi]: 95 % bootstrap interval; an "
                      "interval that excludes 0 is a difference this split can tell):", ""] + _md_table(*differences)
    lines += ["", "| dataset | data | split | task | metric | chance | images | classes × templates / texts |",
              "|---|---|---|---|---|---|---|---|"]
    for d in report["datasets"]:
        what = f"{d['num_classes']} × {d['num_templates']}" if d["task"] == "zeroshot" else f"{d['num_texts']} texts"
        lines.append(f"| {d['name']} | `{d['data']}` | {d['split']} | {d['task']} | {d['metric']} "
                     f"| {_pct(d.get('chance'))} | {d['num_rows']} | {what} |")
    lines += ["", f"{report['runtime']['device']}, torch {report['runtime']['torch']}, "
                  f"{report['runtime']['seconds']} s."]
    return "\n".join(lines) + "\n"


def _bar_chart(report: dict, name: str, metric: str) -> str:
    """One horizontal SVG bar per model; the reference's bar is dark."""
    rows = report["models"]
    width, bar_h, label_w = 640, 22, 260
    height = bar_h * len(rows) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(name)} {html.escape(metric)}">']
    for i, row in enumerate(rows):
        score = row["results"][name]["score"]
        y = 5 + i * bar_h
        w = max(1.0, (width - label_w - 70) * score)
        colour = {"reference": "#33507a", "ceiling": "#8a8a8a"}.get(row["role"], "#6d9bd1")
        parts.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end" font-size="12">'
                     f'{html.escape(_label(row)[-40:])}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{bar_h - 6}" fill="{colour}"/>')
        parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + 15}" font-size="12">{_pct(score)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def to_html(report: dict) -> str:
    note = "".join(f"<p>{html.escape(n)}</p>" for n in notes(report))
    differences = difference_rows(report)
    if differences:
        note += "<h2>Paired differences</h2>" + _html_table(*differences)
    charts = "".join(f"<h3>{html.escape(d['name'])}: {html.escape(d['metric'])}</h3>"
                     f"{_bar_chart(report, d['name'], d['metric'])}" for d in report["datasets"])
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}td:first-child{text-align:left}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Zero-shot benchmark</title>"
            f"<style>{style}</style></head><body><h1>Zero-shot benchmark: {html.escape(report['suite'])}</h1>"
            f"{_html_table(*table_rows(report))}{note}<h2>Per dataset</h2>{charts}"
            f"<p>{html.escape(report['runtime']['device'])}, torch {html.escape(report['runtime']['torch'])}, "
            f"{report['runtime']['seconds']} s.</p></body></html>\n")


def write_report(report: dict, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "benchmark.json", "md": out / "benchmark.md", "html": out / "benchmark.html"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(to_markdown(report))
    paths["html"].write_text(to_html(report))
    return paths
