"""Edge bundles: layout, round trip against torch, precisions, tampering, CLI, and no torch."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipcore.imaging import ImageTransform, decode_image
from clipcore.zeroshot import build_classifier, zeroshot_logits
from exports.bundle import write_bundle
from exports.predict import main as predict_main
from exports.runtime import (
    BundleError,
    InvalidModelError,
    load_bundle,
    sha256_file,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "car", "tree", "boat"]
BUNDLE_FILES = {"image_encoder.onnx", "classes.json", "text_embeddings.npy", "config.json", "manifest.json"}


def make_image(mode: str, seed: int = 0, size=(40, 52)) -> Image.Image:
    """A random picture in ``mode`` (RGB, L, RGBA, P, I;16, ...)."""
    rng = np.random.RandomState(seed)
    rgb = Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(rng.randint(0, 256, (size[1], size[0]), dtype=np.uint8)))
        return rgba
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if mode == "I;16":
        return Image.fromarray(rng.randint(0, 65536, (size[1], size[0])).astype(np.uint16))
    return rgb.convert(mode)


MODES = ("RGB", "L", "RGBA", "P", "I;16")


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    directory = tmp_path_factory.mktemp("images")
    paths = []
    for i, mode in enumerate(MODES):
        img = make_image(mode, seed=i)
        assert img.mode == mode
        paths.append(directory / f"{i}_{mode.replace(';', '')}.png")
        img.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def bundle(tiny_clip, tmp_path_factory) -> Path:
    return write_bundle(tiny_clip, CLASSES, "simple", tmp_path_factory.mktemp("bundles") / "fp32")


def torch_probs(model, images, classnames=CLASSES) -> np.ndarray:
    """The reference: the same decode and preprocessing, then the torch model and zero-shot head."""
    pixels = np.stack([model.image_transform(decode_image(str(img) if isinstance(img, Path) else img)) for img in images])
    with torch.no_grad():
        head = build_classifier(model, classnames, "simple")
        logits = zeroshot_logits(model, model.encode_image(torch.from_numpy(pixels)), head)
    return logits.softmax(-1).numpy()


def test_bundle_layout_and_round_trip(tiny_clip, bundle, image_files):
    assert {p.name for p in bundle.iterdir()} == BUNDLE_FILES
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["files"]) == BUNDLE_FILES - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(bundle / name)
    config = json.loads((bundle / "config.json").read_text())
    assert config["precision"] == "fp32"
    assert config["logit_scale"] == pytest.approx(tiny_clip.logit_scale.item())
    assert ImageTransform.from_dict(config["preprocess"]) == tiny_clip.image_transform
    assert config["image_encoder"]["inputs"] == ["pixel_values"]
    assert json.loads((bundle / "classes.json").read_text()) == CLASSES
    emb = np.load(bundle / "text_embeddings.npy")
    assert emb.dtype == np.float32 and emb.shape == (len(CLASSES), tiny_clip.embed_dim)
    np.testing.assert_allclose(emb, build_classifier(tiny_clip, CLASSES, "simple").numpy(), atol=1e-6)

    clf = load_bundle(bundle, threads=1)
    probs = clf.predict_proba(image_files, batch_size=2)
    np.testing.assert_allclose(probs, torch_probs(tiny_clip, image_files), atol=1e-5)
    top = clf.predict(image_files, top_k=3)
    assert [len(t) for t in top] == [3] * len(image_files)
    for row, preds in zip(probs, top):
        assert [p.index for p in preds] == list(np.argsort(-row)[:3])
        assert preds[0].label == CLASSES[preds[0].index] and preds[0].prob == pytest.approx(row.max())
    assert len(clf.predict(image_files[0], top_k=100)[0]) == len(CLASSES)  # single image, k clipped
    assert clf.embed([]).shape == (0, tiny_clip.embed_dim)


def test_images_of_any_mode_bytes_and_dicts(tiny_clip, bundle):
    clf = load_bundle(bundle, threads=1)
    images = [make_image(mode, seed=3) for mode in MODES + ("LA", "CMYK", "1")]
    buf = io.BytesIO()
    make_image("RGB", seed=4).save(buf, format="JPEG")
    images += [buf.getvalue(), {"bytes": buf.getvalue(), "path": "x.jpg"}]
    probs = clf.predict_proba(images)
    assert probs.shape == (len(images), len(CLASSES)) and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, torch_probs(tiny_clip, images), atol=1e-5)


@pytest.mark.parametrize("precision,min_cos", [("fp16", 0.99), ("int8-dynamic", 0.9), ("int8-static", 0.9)])
def test_bundle_precisions(tiny_clip, bundle, image_files, tmp_path, precision, min_cos):
    calibration = [make_image(m, seed=10 + i) for i, m in enumerate(MODES * 2)] if precision == "int8-static" else None
    out = write_bundle(tiny_clip, CLASSES, "simple", tmp_path / precision, precision=precision,
                       calibration_images=calibration)
    clf = load_bundle(out, threads=1)
    assert clf.precision == precision
    ref = load_bundle(bundle, threads=1).embed(image_files)
    got = clf.embed(image_files)
    assert np.isfinite(got).all()
    assert (ref * got).sum(1).min() > min_cos
    assert (out / "image_encoder.onnx").stat().st_size > 0


def test_write_bundle_argument_errors(tiny_clip, bundle, tmp_path):
    with pytest.raises(FileExistsError, match="not empty"):
        write_bundle(tiny_clip, CLASSES, "simple", bundle)
    with pytest.raises(ValueError, match="precision"):
        write_bundle(tiny_clip, CLASSES, "simple", tmp_path / "b", precision="int4")
    with pytest.raises(ValueError, match="calibration_images"):
        write_bundle(tiny_clip, CLASSES, "simple", tmp_path / "b", precision="int8-static")
    with pytest.raises(ValueError, match="empty"):
        write_bundle(tiny_clip, [], "simple", tmp_path / "b")
    assert not (tmp_path / "b").exists()
    # overwrite replaces the directory whole, reusing a precomputed head
    head = build_classifier(tiny_clip, CLASSES[:2], "simple")
    out = write_bundle(tiny_clip, CLASSES[:2], "simple", tmp_path / "c", class_embeddings=head)
    out = write_bundle(tiny_clip, CLASSES, "simple", out, overwrite=True)
    assert load_bundle(out).classnames == CLASSES
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def _copy(bundle: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / name))


@pytest.mark.parametrize("target", ["image_encoder.onnx", "classes.json", "text_embeddings.npy", "config.json"])
def test_tampered_file_is_refused(bundle, tmp_path, target):
    copy = _copy(bundle, tmp_path, "tampered")
    data = bytearray((copy / target).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / target).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{target}: sha256 mismatch"):
        load_bundle(copy)


def test_missing_unlisted_and_inconsistent_files_are_refused(bundle, tiny_clip_dir, tmp_path):
    copy = _copy(bundle, tmp_path, "missing")
    (copy / "classes.json").unlink()
    with pytest.raises(BundleError, match=r"classes.json: listed in manifest.json but missing"):
        load_bundle(copy)

    copy = _copy(bundle, tmp_path, "unlisted")
    write_manifest(copy, ["image_encoder.onnx", "text_embeddings.npy", "config.json"])
    with pytest.raises(BundleError, match=r"classes.json: required file not listed"):
        load_bundle(copy)

    copy = _copy(bundle, tmp_path, "escape")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["../outside.txt"] = {"sha256": "0" * 64, "bytes": 0}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(copy)

    # a consistent manifest over a corrupt model: the ONNX error names the file
    copy = _copy(bundle, tmp_path, "corrupt")
    (copy / "image_encoder.onnx").write_bytes(b"not an onnx model at all")
    write_manifest(copy, ["image_encoder.onnx", "classes.json", "text_embeddings.npy", "config.json"])
    with pytest.raises(InvalidModelError, match=r"image_encoder.onnx: not a valid ONNX model"):
        load_bundle(copy)

    copy = _copy(bundle, tmp_path, "dims")
    np.save(copy / "text_embeddings.npy", np.ones((len(CLASSES), 7), np.float32))
    write_manifest(copy, ["image_encoder.onnx", "classes.json", "text_embeddings.npy", "config.json"])
    with pytest.raises(BundleError, match="16-d embeddings but text_embeddings.npy holds 7-d"):
        load_bundle(copy)

    copy = _copy(bundle, tmp_path, "size")
    config = json.loads((copy / "config.json").read_text())
    config["preprocess"].update(size=48, crop_size=[48, 48])
    (copy / "config.json").write_text(json.dumps(config))
    write_manifest(copy, ["image_encoder.onnx", "classes.json", "text_embeddings.npy", "config.json"])
    with pytest.raises(BundleError, match=r"expects pixel input \[3, 32, 32\] but the bundle's preprocessing produces \[3, 48, 48\]"):
        load_bundle(copy)

    copy = _copy(bundle, tmp_path, "future")
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(BundleError, match="newer than this runtime"):
        load_bundle(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": "something-else"}))
    with pytest.raises(BundleError, match="manifest.json: not a clip-distill-zeroshot-bundle manifest"):
        load_bundle(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json: unreadable JSON"):
        load_bundle(copy)

    copy = _copy(bundle, tmp_path, "nomanifest")
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="not a zero-shot bundle"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="not a zero-shot bundle"):
        load_bundle(tiny_clip_dir)  # a model directory is not a bundle
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_predict_cli(bundle, image_files, tmp_path, capsys):
    assert predict_main([str(bundle), str(image_files[0]), str(image_files[1]), "--top-k", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count(":\n") == 2 and all(str(p) in out for p in image_files[:2])

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code = predict_main([str(bundle), str(image_files[2]), str(broken), "--json", "--top-k", "3"])
    captured = capsys.readouterr()
    assert code == 1 and "broken.png" in captured.err
    doc = json.loads(captured.out)
    assert doc["precision"] == "fp32"
    ok, bad = doc["results"]
    assert [p["label"] for p in ok["predictions"]][:1] and len(ok["predictions"]) == 3
    assert "cannot decode image" in bad["error"]

    assert predict_main([str(tmp_path), str(image_files[0])]) == 2
    assert "not a zero-shot bundle" in capsys.readouterr().err


_NO_TORCH = textwrap.dedent(
    """
    import json, sys
    for name in ("torch", "transformers", "onnx", "optimum", "safetensors"):
        sys.modules[name] = None  # any import of these now raises ImportError
    from exports.runtime import load_bundle
    from exports.predict import main
    bundle, out, images = sys.argv[1], sys.argv[2], sys.argv[3:]
    probs = load_bundle(bundle, threads=1).predict_proba(images)
    code = main([bundle, *images, "--json", "--threads", "1"])
    heavy = sorted(m for m in ("torch", "transformers", "onnx", "optimum") if sys.modules.get(m) is not None)
    json.dump({"probs": probs.tolist(), "cli_exit": code, "heavy": heavy}, open(out, "w"))
    """
)


def test_runtime_works_without_torch_or_transformers(tiny_clip, bundle, image_files, tmp_path):
    result = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(bundle), str(result), *map(str, image_files)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(result.read_text())
    assert data["heavy"] == [] and data["cli_exit"] == 0
    np.testing.assert_allclose(np.array(data["probs"]), torch_probs(tiny_clip, image_files), atol=1e-5)
    cli = json.loads(proc.stdout)
    assert [r["image"] for r in cli["results"]] == [str(p) for p in image_files]


def test_a_model_with_nan_outputs_is_never_bundled_and_never_printed(tiny_clip_dir, bundle, image_files, tmp_path,
                                                                      capsys):
    """Issue 28, item 5: finite weights that overflow to NaN outputs were bundled, and predict printed
    ``nan`` for every class with exit 0 (``--json``: bare ``NaN``, not JSON)."""
    from clipcore.loading import load_teacher
    from exports.onnx_export import export_image_encoder
    from exports.runtime import NonFiniteOutputError

    model = load_teacher(str(tiny_clip_dir))
    with torch.no_grad():
        model.model.visual_projection.weight.fill_(3e38)  # finite, but every image embedding overflows
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match=r"image_encoder.onnx: gives NaN or inf image embeddings for a probe input"):
        write_bundle(model, CLASSES, "simple", tmp_path / "nan")
    assert not (tmp_path / "nan").exists() and not list(tmp_path.glob(".nan*"))
    # the runtime refuses such an encoder rather than printing NaN probabilities
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    export_image_encoder(model, broken / "image_encoder.onnx")
    write_manifest(broken, json.loads((broken / "manifest.json").read_text())["files"])
    clf = load_bundle(broken, threads=1)
    with pytest.raises(NonFiniteOutputError, match=r"image_encoder.onnx: gives NaN or inf embeddings for 5 of 5"):
        clf.predict(image_files)
    assert predict_main([str(broken), *map(str, image_files), "--json"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: ") and "image_encoder.onnx: gives NaN or inf" in out.err
