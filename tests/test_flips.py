"""What flips: flipped images with thumbnails, per-class damage, histograms, in JSON, Markdown and HTML."""

from __future__ import annotations

import base64
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from clipcore.data import DataSpec
from clipcore.loading import load_teacher
from clipcore.testing import make_tiny_clip
from exports.flips import analyse, by_margin, per_image_kl, top1_margin
from exports.onnx_export import export_image_encoder
from exports.parity import DEFAULT_GATES, Gate, ParitySettings, run_parity
from exports.providers import ProviderInfo
from students import build_student
from tests.conftest import require_chromium
from tests.datagen import write_labelled

CPU_ONLY = ProviderInfo(ort_providers=("CPUExecutionProvider",), cuda_devices=0, torch_cuda=False, tensorrt_version=None)
NAMES = ["cat", "dog", "car"]


def _logp(probs) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64))


def test_analyse_counts_orders_and_bins():
    student = _logp([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    variant = _logp([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.45, 0.5, 0.05]])
    labels = np.array([0, 1, 2, 0])
    emb = np.eye(4, 3)
    images = {10 + i: Image.new("RGB", (32, 32), (60 * i, 0, 0)) for i in range(4)}
    out = analyse({"v": (variant, emb), "same": (student, emb)}, (student, emb), labels, np.arange(10, 14), NAMES,
                  images.__getitem__, max_flips=1)
    v = out["v"]
    assert v["flipped"] == 2 and v["images"] == 4 and out["same"]["flipped"] == 0
    # the larger KL first, capped at max_flips
    kl = per_image_kl(student, variant)
    assert kl[1] > kl[3] and [f["row"] for f in v["shown"]] == [11]
    flip = v["shown"][0]
    assert flip["label"] == "dog" and flip["student_top3"][0] == {"label": "dog", "prob": pytest.approx(0.8)}
    assert flip["variant_top3"][0] == {"label": "cat", "prob": pytest.approx(0.6)}
    thumb = Image.open(io.BytesIO(base64.b64decode(flip["thumbnail"].split(",", 1)[1])))
    assert thumb.size == (64, 64) and thumb.getpixel((0, 0)) == (60, 0, 0)
    # dog lost its only image (100 -> 0 %), cat lost one of two (-50 points), car none
    assert [(r["class"], r["top1_delta"]) for r in v["per_class"]] == [("dog", -1.0), ("cat", -0.5), ("car", 0.0)]
    # the flips are images 3 (margin log 2, the smallest: the first part) and 1 (log 8, tied with images 0 and 2,
    # which keep their order: the third part)
    assert [(r["images"], r["flipped"]) for r in v["by_margin"]] == [(1, 1), (1, 0), (1, 1), (1, 0)]
    assert v["per_class"][1]["agreement"] == 0.5
    for key in ("log10_kl_student", "emb_cos_student"):
        assert sum(v["histograms"][key]["counts"]) == 4
        assert v["histograms"][key]["edges"] == out["same"]["histograms"][key]["edges"]  # shared: they overlay


def test_flips_by_the_students_top1_margin():
    """Fifths by the torch student's log-probability gap between its two best classes, smallest first: a variant
    that flips only near-ties shows every flip in the first fifth."""
    logp = _logp([[0.5, 0.45, 0.05], [0.9, 0.05, 0.05], [0.34, 0.33, 0.33]])
    np.testing.assert_allclose(top1_margin(logp), [np.log(0.5 / 0.45), np.log(0.9 / 0.05), np.log(0.34 / 0.33)])
    assert top1_margin(np.zeros((2, 1))).tolist() == [0.0, 0.0]
    margin = np.arange(10, dtype=float)[::-1]  # image 9 has the smallest margin
    flipped = np.zeros(10, dtype=bool)
    flipped[[9, 8, 5]] = True  # both of the smallest fifth, one of the middle one
    rows = by_margin(margin, flipped)
    assert [r["images"] for r in rows] == [2] * 5 and [r["flipped"] for r in rows] == [2, 0, 1, 0, 0]
    assert rows[0]["margin_low"] == 0.0 and rows[0]["margin_high"] == 1.0 and rows[0]["agreement"] == 0.0
    assert rows[2]["agreement"] == 0.5 and rows[-1]["margin_high"] == 9.0
    assert [r["images"] for r in by_margin(np.ones(3), np.zeros(3, dtype=bool))] == [1, 1, 1]  # ties split by rank


def negated(src: Path, dst: Path) -> Path:
    """``src`` with its embedding output negated (a random tiny student predicts one class for all
    images; noise alone may flip none, negation flips every one)."""
    model = onnx.load(str(src))
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [o + "_pos" if o == out else o for o in node.output]
    model.graph.node.append(onnx.helper.make_node("Neg", [out + "_pos"], [out]))
    onnx.save(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """A parity run with a broken image encoder (negated embeddings: top-1 becomes the least likely class)."""
    root = tmp_path_factory.mktemp("flips")
    teacher = load_teacher(str(make_tiny_clip(root / "teacher", seed=1)))
    student = build_student("test-tiny-resnet", teacher=teacher)
    write_labelled(root / "data", n=48)
    out = root / "out"
    settings = ParitySettings(templates="simple", threads=1, warmup=0, iters=1, throughput_batch=2,
                              throughput_iters=1, batch_size=16, max_flips=3)
    fp32 = export_image_encoder(student, root / "fp32.onnx")
    noisy = negated(fp32, root / "noisy.onnx")
    gates = {**DEFAULT_GATES, "fp32": Gate()}  # no checks: the broken encoder is kept and shown
    report = run_parity(teacher, student, DataSpec(str(root / "data"), split="test"), out, variants=["fp32"],
                        gates=gates, settings=settings, onnx_files={"noisy": noisy}, provider_info=CPU_ONLY)
    report.write(out)
    return out


def test_flips_in_json_markdown_and_html(report_dir):
    report = json.loads((report_dir / "parity.json").read_text())
    noisy, fp32 = report["flips"]["noisy"], report["flips"]["fp32"]
    assert fp32["flipped"] == 0 and fp32["shown"] == []
    assert noisy["flipped"] > 0 and 0 < len(noisy["shown"]) <= 3
    assert noisy["flipped"] == round((1 - report["subjects"][3]["metrics"]["agreement_student"]) * noisy["images"])
    assert all(f["thumbnail"].startswith("data:image/png;base64,") for f in noisy["shown"])
    assert [c["top1_delta"] for c in noisy["per_class"]] == sorted(c["top1_delta"] for c in noisy["per_class"])
    md = (report_dir / "parity.md").read_text()
    assert "## What flips (against the torch student)" in md and "### noisy" in md
    assert f"{noisy['flipped']} of {noisy['images']} images flipped top-1" in md
    assert sum(r["flipped"] for r in noisy["by_margin"]) == noisy["flipped"]
    assert sum(r["images"] for r in noisy["by_margin"]) == noisy["images"]
    assert "whose torch top-1 wins by the smallest margin" in md and "| 1 of 5 |" in md
    assert fp32["by_margin"] and "smallest margin" not in md.split("### fp32")[1].split("###")[0]  # no flips: no note
    html = (report_dir / "parity.html").read_text()
    root = ET.fromstring(html)
    imgs = [e for e in root.iter() if e.tag.endswith("}img")]
    assert len(imgs) == len(noisy["shown"]) and all(i.get("src").startswith("data:image/png;base64,") for i in imgs)
    ids = [e.get("id") for e in root.iter() if e.get("id")]
    assert len(ids) == len(set(ids))  # the histogram figure's ids do not clash with the other plots'


def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    from scripts.check_report_html import check

    binary = require_chromium()
    result = check(report_dir / "parity.html", tmp_path / "shot.png", binary)
    assert result["errors"] == [] and not result["screenshot_blank"], result
    assert result["images"] == result["images_decoded"] == 3  # the thumbnails decoded and are on screen
    assert result["plots"] == result["plots_laid_out"] == 3  # accuracy/latency, agreement, histograms
    assert result["passed"]
