"""The parity report's evaluation and calibration data: bad input is named, fallbacks are said."""

from __future__ import annotations

import datasets
import pytest

from clipcore.data import DataSpec, DataSpecError
from clipcore.imaging import ImageTransform
from exports.parity.eval_data import calibration_reader, load_eval_data
from exports.parity.gates import ParityInputError
from exports.parity.results import ParitySettings
from tests.datagen import png, write_captions, write_labelled

TRANSFORM = ImageTransform(size=16, crop_size=(16, 16))


def _write(root, features, rows, split="test"):
    root.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=datasets.Features(features)).to_parquet(
        str(root / f"{split}-00000-of-00001.parquet"))
    return root


def test_evaluation_data_needs_labels_and_class_names(tmp_path):
    captions = write_captions(tmp_path / "captions")
    with pytest.raises(DataSpecError, match=r"zero-shot parity needs a label column \(columns: \['image', 'captions'\]\)"):
        load_eval_data(DataSpec(str(captions), split="train"), {"student": TRANSFORM})
    ints = _write(tmp_path / "ints", {"image": datasets.Image(), "label": datasets.Value("int64")},
                  {"image": [{"bytes": png(i), "path": None} for i in range(4)], "label": [0, 1, 0, 1]})
    with pytest.raises(DataSpecError, match=r"label column 'label' is not a ClassLabel; pass classnames"):
        load_eval_data(DataSpec(str(ints), split="test"), {"student": TRANSFORM})
    data = load_eval_data(DataSpec(str(ints), split="test"), {"student": TRANSFORM}, classnames="cat,dog")
    assert data.classnames == ["cat", "dog"]
    mapping = tmp_path / "names.json"
    mapping.write_text('{"n01": "cat", "n02": "dog"}')
    with pytest.raises(ParityInputError, match=r"class names for .*ints.*: a class-name mapping needs ClassLabel names"):
        load_eval_data(DataSpec(str(ints), split="test"), {"student": TRANSFORM}, classnames=str(mapping))
    with pytest.raises(ParityInputError, match=r"--classnames is empty"):
        load_eval_data(DataSpec(str(ints), split="test"), {"student": TRANSFORM}, classnames=" , ")


def test_calibration_falls_back_to_the_evaluation_split_and_says_so(tmp_path):
    root = write_labelled(tmp_path / "data", n=12)
    (root / "train-00000-of-00001.parquet").unlink()  # only a test split
    data = load_eval_data(DataSpec(str(root), split="test"), {"student": TRANSFORM})
    reader, source = calibration_reader(data, TRANSFORM, ParitySettings(calibration_limit=8))
    assert source.endswith("(the evaluation split: no 'train' split)")
    batches = list(iter(reader.get_next, None))
    assert sum(len(b["pixel_values"]) for b in batches) == 7  # 8 drawn, the corrupt row dropped
    # calibration data named explicitly: no silent fallback to the evaluation images
    settings = ParitySettings(calibration_data=str(root), calibration_limit=8)
    with pytest.raises(DataSpecError, match="train"):
        calibration_reader(data, TRANSFORM, settings)


def test_calibration_with_no_decodable_image_is_an_error(tmp_path):
    root = _write(tmp_path / "broken", {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])},
                  {"image": [{"bytes": b"not an image", "path": f"bad{i}.png"} for i in range(3)], "label": [0, 1, 0]},
                  split="train")
    good = write_labelled(tmp_path / "good", n=6)
    data = load_eval_data(DataSpec(str(good), split="test"), {"student": TRANSFORM})
    with pytest.raises(DataSpecError, match="no decodable calibration image for int8-static"):
        calibration_reader(data, TRANSFORM, ParitySettings(calibration_data=str(root)))


def test_variant_lists_and_user_graphs_are_checked_before_any_work(tmp_path):
    from exports.parity.variants import check_onnx_files, check_variant_names

    assert check_variant_names(["fp32", "int8"]) == ["fp32", "int8"]
    with pytest.raises(ParityInputError, match=r"variants listed twice: \['fp32', 'int8', 'fp32'\]"):
        check_variant_names(["fp32", "int8", "fp32"])
    with pytest.raises(ParityInputError, match=r"--onnx names \['student', 'fp16'\] clash with built-in subjects"):
        check_onnx_files({"student": tmp_path / "a.onnx", "fp16": tmp_path / "b.onnx", "mine": tmp_path / "c.onnx"})


def test_int8_float_layers_come_from_the_cli_and_are_checked():
    from exports.parity.cli import build_parser, settings_from_args

    args = build_parser().parse_args(["--teacher", "t", "--student", "s", "--data", "d", "--int8-float-layers", "13"])
    assert settings_from_args(args).int8_float_layers == 13
    with pytest.raises(ParityInputError, match="int8_float_layers"):
        ParitySettings(int8_float_layers=-1)
