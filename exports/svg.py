"""Matplotlib figures as inline SVG, for the self-contained HTML reports (parity, flips)."""

from __future__ import annotations

import io


def figure_svg(fig) -> str:
    """The figure as an inline ``<svg>`` element (XML declaration and DOCTYPE removed)."""
    import matplotlib

    buf = io.StringIO()
    # text as <text> elements, not glyph outlines: the page stays searchable and about a third smaller
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]
