"""benchmarks/bundle_latency.py: the device-cost numbers of the README's bundle table, on a tiny bundle."""

from __future__ import annotations

import json

import pytest

from tests.scripts import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("benchmarks/bundle_latency.py")


def test_times_image_and_new_class_names_of_a_bundle(script, tiny_clip, tmp_path, capsys):
    from exports.bundle import write_bundle

    bundle = write_bundle(tiny_clip, ["cat", "dog", "car"], "simple", tmp_path / "b", text_encoder=True)
    image, text = bundle / "image_encoder.onnx", bundle / "text_encoder.onnx"
    result = script.main([str(bundle), "--image", f"again={image}", "--text", f"again={text}", "--iters", "100",
                          "--names", "3", "--out", str(tmp_path / "r.json")])
    assert set(result["image"]) == set(result["class_name"]) == {"bundle", "again"}
    for p50, p95 in [*result["image"].values(), *result["class_name"].values()]:
        assert 0 < p50 <= p95
    assert result["templates"] == 1 and result["cold_start_ms"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["templates"] == 1
    out = capsys.readouterr().out
    assert "| bundle |" in out and "| again |" in out and "cold start" in out


def test_refuses_a_bundle_without_text_encoder_and_bad_files(script, tiny_clip, tmp_path):
    from exports.bundle import write_bundle

    bundle = write_bundle(tiny_clip, ["cat", "dog"], "simple", tmp_path / "b")
    with pytest.raises(SystemExit, match="has no text encoder"):
        script.main([str(bundle), "--iters", "100"])
    with pytest.raises(SystemExit, match="--image 'x=/nope.onnx': expected NAME=PATH"):
        script.main([str(bundle), "--image", "x=/nope.onnx"])
