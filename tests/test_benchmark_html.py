"""``benchmark.html``, as ``python -m distill.benchmark`` writes it, in a real browser: it loads
without an error, every bar chart is laid out with a size, and the page is not blank
(scripts/check_report_html.py, the check the parity report gets in tests/test_flips.py)."""

from __future__ import annotations

import yaml

from tests.conftest import require_chromium
from tests.datagen import write_captions, write_labelled


def test_benchmark_html_renders_in_headless_chromium(tiny_clip_dir, tmp_path):
    from distill.benchmark import main
    from scripts.check_report_html import check

    binary = require_chromium()  # before the benchmark runs: nothing to do without a browser
    labelled, captions = write_labelled(tmp_path / "labelled", n=8), write_captions(tmp_path / "captions", n=6)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump([
        {"name": "labelled", "data": str(labelled), "split": "test", "templates": "simple"},
        {"name": "captions", "data": str(captions), "split": "train", "task": "retrieval",
         "metric": "text_to_image_R@1"},
    ]))
    out = tmp_path / "out"
    main(["--model", str(tiny_clip_dir), "--random-init", "--reference", str(tiny_clip_dir), "--suite", str(suite),
          "--out", str(out), "--batch-size", "8", "--no-progress", "--device", "cpu"])
    result = check(out / "benchmark.html", tmp_path / "shot.png", binary)
    assert result["errors"] == [] and not result["screenshot_blank"], result
    assert result["plots"] >= 2 and result["plots_laid_out"] == result["plots"], result  # a chart per dataset
    assert result["images"] == result["images_decoded"]
    assert result["passed"], result
