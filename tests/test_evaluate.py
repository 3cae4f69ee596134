import json

import pytest

from distill.evaluate import main
from tests.conftest import require_shared
from tests.datagen import write_captions as _write_captions
from tests.datagen import write_labelled as _write_labelled


def test_zeroshot_and_linear_probe_end_to_end(tiny_clip_dir, tmp_path, capsys):
    data = _write_labelled(tmp_path / "labelled")
    (tmp_path / "labelled").mkdir(exist_ok=True)
    out = tmp_path / "report.json"
    report = main(["--model", str(tiny_clip_dir), "--data", str(data), "--split", "test",
                   "--task", "zeroshot", "linear-probe", "--templates", "openai_cifar",
                   "--batch-size", "8", "--output", str(out), "--no-progress"])
    assert json.loads(out.read_text()) == report
    assert report["num_images"] == 23 and report["num_failed_images"] == 1
    zs = report["zeroshot"]
    assert zs["num_classes"] == 3 and zs["num_templates"] == 18
    assert 0 <= zs["top1"] <= zs["top5"] == 1.0  # 3 classes: top-5 always hits
    lp = report["linear_probe"]
    assert lp["num_train"] == 23 and 0 <= lp["top1"] <= 1 and lp["best_c"] > 0
    assert report["format_version"] == 1 and report["model_fingerprint"]


def test_classname_override_and_errors(tiny_clip_dir, tmp_path):
    data = _write_labelled(tmp_path)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"cat": "tabby cat, cat", "dog": "dog", "car": "automobile, car"}))
    report = main(["--model", str(tiny_clip_dir), "--data", str(data), "--classnames", str(names), "--no-progress"])
    assert report["zeroshot"]["num_classes"] == 3
    with pytest.raises(ValueError, match="2 class names given but the dataset has 3"):
        main(["--model", str(tiny_clip_dir), "--data", str(data), "--classnames", "a,b", "--no-progress"])
    with pytest.raises(ValueError, match="caption"):
        main(["--model", str(tiny_clip_dir), "--data", str(data), "--task", "retrieval", "--no-progress"])


def test_retrieval_end_to_end(tiny_clip_dir, tmp_path):
    data = _write_captions(tmp_path)
    report = main(["--model", str(tiny_clip_dir), "--data", str(data), "--split", "train", "--no-progress"])
    r = report["retrieval"]
    assert r["num_images"] == 12 and r["num_texts"] == 18
    for direction in ("image_to_text", "text_to_image"):
        assert set(r[direction]) == {"R@1", "R@5", "R@10"}
        assert r[direction]["R@1"] <= r[direction]["R@5"] <= r[direction]["R@10"] <= 1


def test_unknown_model_offline_gives_clear_error(tmp_path):
    data = _write_labelled(tmp_path)
    with pytest.raises(OSError, match="pass DIR instead"):
        main(["--model", "someone/not-a-cached-model", "--data", str(data), "--no-progress"])


def test_cli_exit_code_on_bad_input(tiny_clip_dir, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "distill.evaluate", "--model", str(tiny_clip_dir),
                           "--data", str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2 and "error:" in proc.stderr and "missing" in proc.stderr


@pytest.mark.slow
def test_vit_b32_architecture_on_256_cifar10_images(tmp_path):
    clip_dir = require_shared("clip-vit-base-patch32")
    cifar = require_shared("cifar10")
    # --shuffle: the test parquet is sorted by label (its first 256 images are all airplanes), so a
    # random model that happens to answer "airplane" everywhere would score 100 % on the first 256
    report = main(["--model", str(clip_dir), "--random-init", "--data", str(cifar), "--split", "test",
                   "--limit", "256", "--shuffle", "--batch-size", "64", "--output", str(tmp_path / "r.json"),
                   "--no-progress"])
    assert report["num_images"] == 256 and report["zeroshot"]["num_classes"] == 10
    assert report["zeroshot"]["num_templates"] == 18
    assert 0.0 <= report["zeroshot"]["top1"] <= 0.3  # random weights: about chance (10 %)
