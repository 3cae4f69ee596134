"""exports.predict decodes one batch at a time: peak memory follows the batch, not the file count;
an image over the pixel limit is refused alone; bad --batch-size / --top-k are errors (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from exports.bundle import write_bundle
from exports.predict import main as predict_main
from exports.runtime import load_bundle

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "car"]


@pytest.fixture(scope="module")
def bundle(tiny_clip, tmp_path_factory) -> Path:
    return write_bundle(tiny_clip, CLASSES, "simple", tmp_path_factory.mktemp("predict") / "b")


def big_png(path: Path, seed: int, size=(1500, 1000)) -> Path:
    """A 1.5-megapixel picture (4.5 MB decoded) that compresses to a few KB: smooth gradients."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    arr = np.stack([(x + seed * 40) % 256 + 0 * y, (y + seed * 70) % 256 + 0 * x, (x + y) / 2], -1)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


_PEAK = textwrap.dedent(
    """
    import json, sys
    from exports.predict import main
    code = main(sys.argv[1:])
    # VmHWM: peak resident memory of this process image (ru_maxrss would start at pytest's, inherited at fork)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"code": code, "peak_mib": int(hwm.split()[1]) / 1024}), file=sys.stderr)
    """
)


def peak_rss_mib(bundle: Path, images: list[Path], *flags: str) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(bundle), *map(str, images), "--json", "--threads", "1",
                           *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert result["code"] == 0, proc.stderr
    assert len(json.loads(proc.stdout)["results"]) == len(images)
    return result["peak_mib"]


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads peak memory from Linux /proc")
def test_peak_memory_follows_the_batch_not_the_number_of_images(bundle, tmp_path):
    files = [big_png(tmp_path / f"{i}.png", i) for i in range(4)]
    one = peak_rss_mib(bundle, files[:1], "--batch-size", "4")
    many = peak_rss_mib(bundle, files * 30, "--batch-size", "4")  # 120 images, 540 MB if all held decoded
    assert many - one < 100, f"peak RSS {one:.0f} MiB for 1 image, {many:.0f} MiB for 120"


def test_image_over_the_pixel_limit_is_refused_alone(bundle, tmp_path, capsys):
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(small)
    big = big_png(tmp_path / "big.png", 0)
    code = predict_main([str(bundle), str(small), str(big), str(small), "--json", "--max-pixels", "1000000"])
    captured = capsys.readouterr()
    assert code == 1
    results = json.loads(captured.out)["results"]
    assert [r["image"] for r in results] == [str(small), str(big), str(small)]
    assert "predictions" in results[0] and "predictions" in results[2]
    assert results[1]["error"] == f"{big}: 1500x1000 = 1,500,000 pixels is over the limit of 1,000,000 (--max-pixels)"
    assert f"error: {big}: 1500x1000" in captured.err


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "error: --batch-size must be a positive integer, got 0"),
    ("--top-k", "0", "error: --top-k must be a positive integer, got 0"),
    ("--top-k", "-2", "error: --top-k must be a positive integer, got -2"),
    ("--max-pixels", "0", "error: --max-pixels must be a positive integer, got 0"),
])
def test_non_positive_counts_are_errors(bundle, tmp_path, capsys, flag, value, message):
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30)).save(image)
    assert predict_main([str(bundle), str(image), flag, value]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == message


def test_classifier_refuses_top_k_and_batch_size_below_one(bundle, tmp_path):
    clf = load_bundle(bundle, threads=1)
    image = Image.new("RGB", (40, 30))
    with pytest.raises(ValueError, match="top_k must be at least 1, got 0"):
        clf.predict([image], top_k=0)
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        clf.predict([image], batch_size=0)


def test_a_directory_stands_for_the_images_under_it(bundle, tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "cats").mkdir(parents=True)
    (photos / ".thumbnails").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(photos / "b.png")
    Image.new("RGB", (40, 30), (10, 200, 10)).save(photos / "cats" / "a.JPG")
    Image.new("RGB", (8, 8)).save(photos / ".thumbnails" / "b.png")  # hidden: left out
    (photos / "notes.txt").write_text("not an image")  # no image extension: left out
    loose = tmp_path / "loose.png"
    Image.new("RGB", (40, 30)).save(loose)
    assert predict_main([str(bundle), str(photos), str(loose), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["image"] for r in results] == [str(photos / "b.png"), str(photos / "cats" / "a.JPG"), str(loose)]
    assert all("predictions" in r for r in results)


def test_a_directory_without_images_is_an_error(bundle, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    assert predict_main([str(bundle), str(empty)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().startswith(f"error: {empty}: no image files under this directory")
