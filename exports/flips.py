"""What flips: the images whose top-1 a variant changed, per-class damage, per-image distributions.

"99.9 % agreement" hides which images the 0.1 % are. For every image variant the parity report
also records (``report["flips"][name]``, rendered by :func:`flips_markdown` / :func:`flips_html`):

* ``flipped``: how many images changed top-1 against the torch student, and up to
  ``max_flips`` of them (largest KL first) with a PNG thumbnail (a data URI, so the HTML stays
  self-contained), the true label, and the torch and variant top-3 with probabilities;
* ``per_class``: per true class, agreement and the accuracy delta (variant - torch student),
  the classes that lose most first;
* ``histograms``: per-image KL(student || variant) (log10 bins) and embedding cosine against the
  torch student, on bin edges shared by all variants so they overlay;
* ``by_margin``: the images in fifths by the torch student's top-1 margin (its log-probability gap between
  its two best classes), the flips in each. Rounding flips near-ties: a 96 % agreement whose flips all sit in
  the smallest-margin fifth is a different file from one that flips confident images.
"""

from __future__ import annotations

import base64
import io
from html import escape
from typing import Any, Mapping, Sequence

import numpy as np

KL_FLOOR = 1e-12  # per-image KL of an exact copy is 0; log10 bins need a floor
THUMB_PX = 64
MARGIN_PARTS = 5  # fifths: enough to show where flips sit, each still ~200 images of a 1,000-image report


def per_image_kl(ref_logp: np.ndarray, logp: np.ndarray) -> np.ndarray:
    return np.maximum((np.exp(ref_logp) * (ref_logp - logp)).sum(axis=1), 0.0)


def top3(logp_row: np.ndarray, classnames: Sequence[str]) -> list[dict[str, Any]]:
    order = np.argsort(-logp_row, kind="stable")[:3]
    return [{"label": classnames[j], "prob": float(np.exp(logp_row[j]))} for j in order]


def per_class(labels: np.ndarray, student_pred: np.ndarray, pred: np.ndarray, classnames: Sequence[str]) -> list[dict]:
    """One row per class present in ``labels``: the classes that lose most accuracy first."""
    rows = []
    for c in np.unique(labels[labels >= 0]):
        sel = labels == c
        torch_acc, acc = float((student_pred[sel] == c).mean()), float((pred[sel] == c).mean())
        rows.append({"class": classnames[int(c)], "images": int(sel.sum()),
                     "agreement": float((pred[sel] == student_pred[sel]).mean()),
                     "top1_student": torch_acc, "top1": acc, "top1_delta": acc - torch_acc})
    return sorted(rows, key=lambda r: (r["top1_delta"], r["agreement"], r["class"]))


def top1_margin(logp: np.ndarray) -> np.ndarray:
    """Each row's log-probability gap between its best and second-best class (0 for a single class)."""
    if logp.shape[1] < 2:
        return np.zeros(len(logp))
    top2 = np.sort(logp, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def by_margin(margin: np.ndarray, flipped: np.ndarray, parts: int = MARGIN_PARTS) -> list[dict[str, Any]]:
    """The images in ``parts`` equal groups by ``margin`` (the torch student's top-1 margin), smallest first: each
    group's margin range, images, flips and agreement. Groups by rank, so ties and small sets still split evenly."""
    rank = np.empty(len(margin), dtype=np.int64)
    rank[np.argsort(margin, kind="stable")] = np.arange(len(margin))
    group = rank * parts // max(len(margin), 1)
    rows = []
    for k in range(parts):
        sel = group == k
        if sel.any():
            rows.append({"part": k + 1, "margin_low": float(margin[sel].min()), "margin_high": float(margin[sel].max()),
                         "images": int(sel.sum()), "flipped": int(flipped[sel].sum()),
                         "agreement": float(1.0 - flipped[sel].mean())})
    return rows


def histogram(values: np.ndarray, edges: np.ndarray) -> dict[str, Any]:
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts],
            "p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "max": float(values.max()), "min": float(values.min())}


def shared_edges(series: Sequence[np.ndarray], bins: int, floor: float | None = None) -> np.ndarray:
    lo = min(float(v.min()) for v in series)
    hi = max(float(v.max()) for v in series)
    if floor is not None:
        lo = max(lo, floor)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def thumbnail(image: Any) -> str:
    """A PNG data URI of ``image``, THUMB_PX on its longer side (nearest-neighbour: pixels stay visible)."""
    from PIL import Image

    from clipcore.imaging import decode_image

    img = decode_image(image, source="<thumbnail>").convert("RGB")
    scale = THUMB_PX / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                     Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def analyse(variants: Mapping[str, tuple[np.ndarray, np.ndarray]], student: tuple[np.ndarray, np.ndarray],
            labels: np.ndarray, rows: np.ndarray, classnames: Sequence[str], image_at, max_flips: int,
            bins: int = 30) -> dict[str, Any]:
    """The flips section for ``variants`` (``{name: (logp (N, C), embeddings (N, D))}``).

    Args:
        student: the torch student's ``(logp, embeddings)``.
        rows: the dataset row of each evaluated image (for thumbnails).
        image_at: ``row -> raw image`` (anything :func:`clipcore.imaging.decode_image` reads).
    """
    if not variants:
        return {}
    s_logp, s_emb = student
    s_pred = s_logp.argmax(axis=1)
    s_margin = top1_margin(s_logp)
    kls = {n: np.log10(np.maximum(per_image_kl(s_logp, lp), KL_FLOOR)) for n, (lp, _) in variants.items()}
    coss = {n: (e.astype(np.float64) * s_emb).sum(axis=1) for n, (_, e) in variants.items()}
    kl_edges = shared_edges(list(kls.values()), bins, floor=np.log10(KL_FLOOR))
    cos_edges = shared_edges(list(coss.values()), bins)
    out = {}
    for name, (logp, _) in variants.items():
        pred = logp.argmax(axis=1)
        flipped = np.flatnonzero(pred != s_pred)
        shown = flipped[np.argsort(-kls[name][flipped], kind="stable")][:max_flips]
        out[name] = {
            "flipped": int(len(flipped)),
            "images": int(len(labels)),
            "shown": [flip_entry(i, int(rows[i]), labels, s_logp, logp, classnames, kls[name], image_at) for i in shown],
            "per_class": per_class(labels, s_pred, pred, classnames),
            "by_margin": by_margin(s_margin, pred != s_pred),
            "histograms": {"log10_kl_student": histogram(kls[name], kl_edges),
                           "emb_cos_student": histogram(coss[name], cos_edges)},
        }
    return out


def flip_entry(i: int, row: int, labels: np.ndarray, s_logp: np.ndarray, logp: np.ndarray,
               classnames: Sequence[str], log_kl: np.ndarray, image_at) -> dict[str, Any]:
    label = int(labels[i])
    try:
        thumb = thumbnail(image_at(row))
    except Exception:  # the image decoded for the evaluation; a thumbnail failure must not end the report
        thumb = None
    return {"row": row, "label": classnames[label] if 0 <= label < len(classnames) else None,
            "student_top3": top3(s_logp[i], classnames), "variant_top3": top3(logp[i], classnames),
            "log10_kl": float(log_kl[i]), "thumbnail": thumb}


# ----------------------------------------------------------------------------- rendering

CLASS_ROWS = 10  # classes listed per variant in Markdown/HTML (all of them are in the JSON)


def _top3_text(items: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(f"{t['label']} {100 * t['prob']:.1f} %" for t in items)


def _class_rows(section: Mapping[str, Any]) -> list[list[str]]:
    return [[r["class"], str(r["images"]), f"{100 * r['agreement']:.2f}", f"{100 * r['top1_student']:.2f}",
             f"{100 * r['top1']:.2f}", f"{100 * r['top1_delta']:+.2f}"] for r in section["per_class"][:CLASS_ROWS]]


def _margin_rows(section: Mapping[str, Any]) -> list[list[str]]:
    return [[f"{r['part']} of {MARGIN_PARTS}", f"{r['margin_low']:.3f}–{r['margin_high']:.3f}", str(r["images"]),
             str(r["flipped"]), f"{100 * r['agreement']:.2f}"] for r in section.get("by_margin", [])]


def _margin_note(section: Mapping[str, Any]) -> str:
    """Where the flips sit: the agreement outside the smallest-margin fifth (empty when nothing flipped)."""
    rows = section.get("by_margin", [])
    if not section["flipped"] or len(rows) < 2:
        return ""
    rest = rows[1:]
    images, flipped = sum(r["images"] for r in rest), sum(r["flipped"] for r in rest)
    first = rows[0]
    return (f"{first['flipped']} of the {section['flipped']} flips are among the {first['images']} images whose torch "
            f"top-1 wins by the smallest margin (up to {first['margin_high']:.3f} in log-probability); on the other "
            f"{images} the agreement is {100 * (1 - flipped / images):.2f} %")


MARGIN_HEADERS = ["torch student's top-1 margin, part", "margin (log-prob gap)", "images", "flipped", "agreement %"]
CLASS_HEADERS = ["class", "images", "agreement %", "top-1 student %", "top-1 variant %", "Δ top-1 (points)"]
FLIP_HEADERS = ["row", "true label", "torch student top-3", "variant top-3", "log10 KL"]


def _summary(name: str, section: Mapping[str, Any]) -> str:
    kl, cos = section["histograms"]["log10_kl_student"], section["histograms"]["emb_cos_student"]
    return (f"{section['flipped']} of {section['images']} images flipped top-1; per-image KL(student‖{name}) "
            f"median 10^{kl['p50']:.1f}, p99 10^{kl['p99']:.1f}, max 10^{kl['max']:.1f}; embedding cosine "
            f"min {cos['min']:.6f}, median {cos['p50']:.6f}")


def flips_markdown(report: Mapping[str, Any]) -> list[str]:
    flips = report.get("flips") or {}
    if not flips:
        return []
    out = ["## What flips (against the torch student)", ""]
    for name, section in flips.items():
        out += [f"### {name}", "", _summary(name, section) + ".", ""]
        if section["shown"]:
            out += ["| " + " | ".join(FLIP_HEADERS) + " |", "|" + "---|" * len(FLIP_HEADERS)]
            out += [f"| {f['row']} | {f['label']} | {_top3_text(f['student_top3'])} | {_top3_text(f['variant_top3'])} "
                    f"| {f['log10_kl']:.2f} |" for f in section["shown"]] + [""]
        note = _margin_note(section)
        if note:
            out += [note + ":", "", "| " + " | ".join(MARGIN_HEADERS) + " |",
                    "|" + "---|" * len(MARGIN_HEADERS)]
            out += ["| " + " | ".join(r) + " |" for r in _margin_rows(section)] + [""]
        out += [f"Classes that lose most (first {CLASS_ROWS}):", "", "| " + " | ".join(CLASS_HEADERS) + " |",
                "|" + "---|" * len(CLASS_HEADERS)]
        out += ["| " + " | ".join(r) + " |" for r in _class_rows(section)] + [""]
    return out


def flips_html(report: Mapping[str, Any], table) -> list[str]:
    """HTML fragments; ``table(headers, rows, text_columns=...)`` is the report's table renderer."""
    flips = report.get("flips") or {}
    if not flips:
        return []
    parts = ["<h2>What flips (against the torch student)</h2>"]
    svg = histograms_svg(flips)
    if svg:
        parts.append(f'<div class="plots"><figure>{svg}<figcaption>Per-image KL from the torch student\'s class '
                     "distribution (log10) and embedding cosine with the torch student, per variant."
                     "</figcaption></figure></div>")
    for name, section in flips.items():
        parts += [f"<h3>{escape(name)}</h3>", f"<p>{escape(_summary(name, section))}.</p>"]
        if section["shown"]:
            parts.append('<div class="flips">' + "".join(_flip_card(f) for f in section["shown"]) + "</div>")
        note = _margin_note(section)
        if note:
            parts += [f"<p>{escape(note)}:</p>", table(MARGIN_HEADERS, _margin_rows(section), text_columns=2)]
        parts += [f"<p>Classes that lose most (first {CLASS_ROWS}):</p>",
                  table(CLASS_HEADERS, _class_rows(section), text_columns=1)]
    return parts


def _flip_card(f: Mapping[str, Any]) -> str:
    img = (f'<img src="{f["thumbnail"]}" width="{THUMB_PX}" alt="row {f["row"]}" />' if f["thumbnail"]
           else "<span>(no thumbnail)</span>")
    return (f'<figure class="flip">{img}<figcaption>row {f["row"]}, true: <b>{escape(str(f["label"]))}</b><br />'
            f"torch: {escape(_top3_text(f['student_top3']))}<br />variant: {escape(_top3_text(f['variant_top3']))}"
            "</figcaption></figure>")


FLIPS_CSS = """
.flips { display: flex; flex-wrap: wrap; gap: 1em; }
figure.flip { width: 200px; font-size: 11px; } figure.flip img { image-rendering: pixelated; border: 1px solid #ccc; }
"""


def histograms_svg(flips: Mapping[str, Any]) -> str:
    """One figure, two panels: per-image log10 KL and embedding cosine, every variant overlaid."""
    try:
        from exports.svg import figure_svg
        from matplotlib.figure import Figure
    except ImportError:
        return ""
    fig = Figure(figsize=(9.0, 3.6))
    axes = fig.subplots(1, 2)
    for (key, title, xlabel), ax in zip((("log10_kl_student", "Per-image KL from the student", "log10 KL"),
                                         ("emb_cos_student", "Per-image embedding cosine", "cosine with torch student")),
                                        axes):
        for name, section in flips.items():
            h = section["histograms"][key]
            ax.stairs(h["counts"], h["edges"], label=name, linewidth=1.4)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("images")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left")
    return figure_svg(fig)
