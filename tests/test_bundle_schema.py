"""Bundles whose hashes are right but whose content is not: refused by the config/manifest schema
(types and bounds) and by the symlink check, in one line, with exit 2 from the predict CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from exports.bundle import write_bundle
from exports.predict import main as predict_main
from exports.runtime import BundleError, load_bundle, write_manifest
from tests.test_runtime import make_image

PAYLOAD = ["image_encoder.onnx", "classes.json", "text_embeddings.npy", "config.json"]


@pytest.fixture(scope="module")
def bundle(tiny_clip, tmp_path_factory) -> Path:
    return write_bundle(tiny_clip, ["cat", "dog", "car"], "simple", tmp_path_factory.mktemp("schema") / "b")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "x.png"
    make_image("RGB").save(path)
    return path


def edit_json(name: str, change: Callable[[object], object]) -> Callable[[Path], None]:
    """Rewrite one JSON file of the bundle, then its manifest, so that every hash is right again."""
    def apply(copy: Path) -> None:
        (copy / name).write_text(json.dumps(change(json.loads((copy / name).read_text()))))
        if name != "manifest.json":
            write_manifest(copy, PAYLOAD)
    return apply


def nested(path: str | tuple[str, ...], value) -> Callable[[dict], dict]:
    def change(doc: dict) -> dict:
        *parents, last = path.split(".") if isinstance(path, str) else path
        node = doc
        for key in parents:
            node = node[key]
        node[last] = value
        return doc
    return change


def symlink_outside(copy: Path) -> None:
    outside = copy.parent / "elsewhere.json"
    shutil.move(copy / "classes.json", outside)  # same bytes, so the sha256 still matches
    (copy / "classes.json").symlink_to(outside)


CASES = {
    "version-abc": (edit_json("manifest.json", nested("version", "abc")), "manifest.json: version: 'abc' is not an integer"),
    "files-entry-string": (edit_json("manifest.json", nested(("files", "classes.json"), "abc")),
                           "manifest.json: files.classes.json: expected an object"),
    "bytes-wrong": (edit_json("manifest.json", nested(("files", "classes.json", "bytes"), 1)),
                    "classes.json: size"),
    "config-a-list": (edit_json("config.json", lambda c: [c]), "config.json: expected a JSON object, got a list"),
    "logit-scale-nan": (edit_json("config.json", nested("logit_scale", float("nan"))),
                        "config.json: logit_scale: nan is not a finite number"),
    "logit-scale-negative": (edit_json("config.json", nested("logit_scale", -3.0)),
                             "config.json: logit_scale: -3.0 is outside"),
    "size-60000": (edit_json("config.json", nested("preprocess.size", 60000)),
                   "config.json: preprocess.size: 60000 is outside [1, 4096]"),
    "crop-not-pair": (edit_json("config.json", nested("preprocess.crop_size", [32])),
                      "config.json: preprocess.crop_size: expected 2 items, got 1"),
    "std-zero": (edit_json("config.json", nested("preprocess.std", [0.0, 1.0, 1.0])),
                 "config.json: preprocess.std[0]: 0.0 is outside"),
    "precision-unknown": (edit_json("config.json", nested("precision", "int4")),
                          "config.json: precision: 'int4' is not one of"),
    "certificate-escapes": (edit_json("config.json", nested("certificate", "/etc/passwd")),
                            "config.json: certificate: '/etc/passwd' points outside the bundle"),
    "text-encoder-not-an-object": (edit_json("config.json", nested("text_encoder", "text.onnx")),
                                   "config.json: text_encoder: expected an object, got str"),
    "text-encoder-precision": (edit_json("config.json", nested("text_encoder", {
        "file": "text_encoder.onnx", "tokenizer": "tokenizer.json", "precision": "int4"})),
        "config.json: text_encoder.precision: 'int4' is not one of"),
    "encoder-file-escapes": (edit_json("config.json", nested("image_encoder.file", "../x.onnx")),
                             "config.json: image_encoder.file: '../x.onnx' points outside the bundle"),
    "num-classes-wrong": (edit_json("config.json", nested("num_classes", 7)),
                          "config.json: num_classes is 7 but classes.json holds 3"),
    "symlink-outside": (symlink_outside, "classes.json: is a symbolic link"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_content_with_right_hashes_is_refused_in_one_line(bundle, image, tmp_path, capsys, case):
    change, message = CASES[case]
    copy = Path(shutil.copytree(bundle, tmp_path / "copy", symlinks=True))
    change(copy)
    with pytest.raises(BundleError) as info:
        load_bundle(copy)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert predict_main([str(copy), str(image), "--threads", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and len(captured.err.strip().splitlines()) == 1
    assert message in captured.err


def test_the_untouched_bundle_still_loads(bundle, image):
    assert load_bundle(bundle).predict([str(image)], top_k=1)[0][0].label in ("cat", "dog", "car")
