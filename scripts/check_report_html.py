"""Render a report's HTML (parity.html, benchmark.html) in headless Chromium and check what a reader would see.

    apt-get install -y chromium                                    # Debian's package
    python scripts/check_report_html.py outputs/default/export/parity.html [--png shot.png]
    python scripts/check_report_html.py outputs/benchmark/benchmark.html

Checks, in a real browser: the page loads without a script or resource error; every ``<img>``
(the flipped images' inline thumbnails) decoded and has a size on screen; every inline ``<svg>``
(the accuracy/latency, agreement and KL/cosine histogram plots) is laid out with a non-zero size;
and the screenshot is not blank. Prints a JSON summary; exits 0 when all pass, 1 when one fails,
2 when Chromium is missing. ``tests/test_flips.py`` (parity) and ``tests/test_benchmark_html.py``
run it on fresh reports; they skip without Chromium, except in CI (.ci/run installs it and sets
CLIP_DISTILL_REQUIRE_CHROMIUM=1, which makes a missing browser a failure). Nothing is fetched: the
reports are self-contained and Chromium runs with networking features off.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run")
# collects errors from the first moment, then reports images and plots once everything has loaded
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && (e.target.src || e.target.tagName)))), true);
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.getBoundingClientRect().width}));
  const svgs = [...document.querySelectorAll('svg')].map(s => { const r = s.getBoundingClientRect(); return [r.width, r.height]; });
  const out = document.createElement('pre');
  out.id = '__check';
  out.textContent = JSON.stringify({imgs, svgs, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


def find_chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def run_chromium(binary: str, url: str, profile: Path, *extra: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *extra, url],
                          capture_output=True, text=True, timeout=timeout)


def check(html_path: str | Path, png: str | Path | None = None, binary: str | None = None) -> dict:
    """Load ``html_path`` in Chromium; returns the summary (``passed`` and what was seen)."""
    binary = binary or find_chromium()
    if binary is None:
        raise FileNotFoundError("no chromium binary on PATH (apt-get install -y chromium)")
    html = Path(html_path).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="report-check-") as tmp:
        probe = Path(tmp) / "probe.html"
        # after <head> opens, so that the error listener sees the page's own resources load
        probe.write_text(re.sub(r"(<head[^>]*>)", lambda m: m.group(1) + PROBE, html, count=1), encoding="utf-8")
        dom = run_chromium(binary, probe.resolve().as_uri(), Path(tmp) / "profile", "--virtual-time-budget=10000",
                           "--dump-dom")
        match = re.search(r'<pre id="__check">(.*?)</pre>', dom.stdout, re.S)
        seen = json.loads(_unescape(match.group(1))) if match else {"imgs": [], "svgs": [], "errors": ["no probe output"]}
        shot = Path(png) if png else Path(tmp) / "shot.png"
        run_chromium(binary, Path(html_path).resolve().as_uri(), Path(tmp) / "profile2", "--window-size=1400,4000",
                     "--hide-scrollbars", f"--screenshot={shot.resolve()}")
        blank = _blank(shot)
    result = {
        "html": str(html_path), "chromium": binary, "images": len(seen["imgs"]),
        "images_decoded": sum(1 for i in seen["imgs"] if i["ok"] and i["w"] > 0),
        "plots": len(seen["svgs"]), "plots_laid_out": sum(1 for w, h in seen["svgs"] if w > 0 and h > 0),
        "errors": seen["errors"], "screenshot": str(png) if png else None, "screenshot_blank": blank,
    }
    result["passed"] = (not result["errors"] and result["images_decoded"] == result["images"]
                        and result["plots"] > 0 and result["plots_laid_out"] == result["plots"] and not blank)
    return result


def _unescape(text: str) -> str:
    import html

    return html.unescape(text)


def _blank(png: Path) -> bool:
    from PIL import Image

    if not png.is_file():
        return True
    lo, hi = Image.open(png).convert("L").getextrema()
    return hi - lo < 10


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html", help="parity.html or benchmark.html")
    p.add_argument("--png", default=None, help="also keep the screenshot here")
    p.add_argument("--chromium", default=None, help="browser binary (default: chromium on PATH)")
    args = p.parse_args(argv)
    try:
        result = check(args.html, args.png, args.chromium)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
