"""FrozenTextStudent.set_mean_share and python -m distill.mean_share: the same share along the teacher's mean."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipcore.loading import load_teacher
from clipcore.testing import make_tiny_clip, make_tiny_tower_teacher
from distill.mean_share import cli, main, teacher_mean
from exports.onnx_export import example_pixels, export_image_encoder
from exports.runtime import OnnxGraph
from exports.interface import IMAGE_ENCODER
from students import (PairedStudent, TextStudentConfig, build_student, build_text_student, load_model,
                      save_student)
from students.image_only import with_mean_share
from tests.datagen import write_labelled


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("share")
    teacher_dir = make_tiny_clip(root / "teacher", seed=1)
    teacher = load_teacher(str(teacher_dir))
    student_dir = save_student(build_student("test-tiny-resnet", teacher=teacher), root / "student")
    return {"root": root, "teacher": teacher, "teacher_dir": teacher_dir, "student_dir": student_dir,
            "data": write_labelled(root / "data", n=12)}


def test_every_embedding_gets_the_share_and_keeps_its_residual_direction():
    g = torch.Generator().manual_seed(0)
    e = F.normalize(torch.randn(5, 8, generator=g) + 2.0, dim=-1)
    axis = torch.randn(8, generator=g) * 3  # any length: only its direction counts
    u = F.normalize(axis, dim=0)
    out = with_mean_share(e, axis, 0.25)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(out @ u, torch.full((5,), 0.25))
    residual = lambda x: F.normalize(x - (x @ u)[:, None] * u, dim=-1)  # noqa: E731
    torch.testing.assert_close(residual(out), residual(e))
    torch.testing.assert_close(with_mean_share(e, axis, 0.0) @ u, torch.zeros(5), atol=1e-6, rtol=0)


def test_the_share_is_saved_loaded_exported_and_paired(setup, tmp_path):
    teacher = setup["teacher"]
    student = load_model(setup["student_dir"], teacher=teacher)
    pixels = example_pixels(student, batch_size=3)
    plain = student.encode_image(pixels)
    axis = torch.randn(teacher.embed_dim, generator=torch.Generator().manual_seed(1))
    student.set_mean_share(axis, 0.3)
    shared = student.encode_image(pixels)
    assert not torch.allclose(shared, plain)
    torch.testing.assert_close(shared @ F.normalize(axis, dim=0), torch.full((3,), 0.3))
    loaded = load_model(save_student(student, tmp_path / "s"), teacher=teacher)
    assert json.loads((tmp_path / "s" / "student.json").read_text())["mean_share"]["share"] == 0.3
    assert torch.equal(loaded.encode_image(pixels), shared) and loaded.fingerprint() == student.fingerprint()
    # the ONNX image encoder applies it too, outside the int8-quantised MatMul/Gemm ops
    graph = OnnxGraph(export_image_encoder(loaded, tmp_path / "image.onnx"), IMAGE_ENCODER)
    onnx = graph.run({IMAGE_ENCODER.inputs[0].name: pixels.numpy()})[IMAGE_ENCODER.outputs[0].name]
    np.testing.assert_allclose(onnx, shared.detach().numpy(), atol=1e-5)
    # static int8 rounds the tower, not the share: the share's ops take no quantised input of their own
    import onnx

    from exports.precision import ArrayCalibrationReader, quantize_int8_static

    name = IMAGE_ENCODER.inputs[0].name
    int8 = quantize_int8_static(tmp_path / "image.onnx", tmp_path / "image.int8.onnx",
                                ArrayCalibrationReader([{name: example_pixels(loaded, 4, seed=s).numpy()} for s in range(3)]))
    nodes = onnx.load(str(int8)).graph.node
    produced_by = {out: n.op_type for n in nodes for out in n.output}
    projections = [n for n in nodes if n.op_type == "ReduceSum"]
    assert projections and all(produced_by.get(i) != "DequantizeLinear" for n in projections for i in n.input)
    got = OnnxGraph(int8, IMAGE_ENCODER).run({name: pixels.numpy()})[IMAGE_ENCODER.outputs[0].name]
    np.testing.assert_allclose(got @ F.normalize(axis, dim=0).numpy(), np.full(3, 0.3), atol=1e-5)
    student.set_mean_share(None)
    torch.testing.assert_close(student.encode_image(pixels), plain)
    assert student.fingerprint() != loaded.fingerprint()


def test_a_pair_with_a_text_student_keeps_the_image_models_share(tmp_path):
    teacher = load_teacher(str(make_tiny_tower_teacher(tmp_path / "tower")))
    image = build_student("test-tiny-resnet", teacher=teacher).eval()
    image.set_mean_share(torch.ones(teacher.embed_dim), 0.4)
    pair = PairedStudent(image, build_text_student(TextStudentConfig("copy", layers=(0, 1)), teacher), name="p")
    pixels = example_pixels(image, batch_size=2)
    torch.testing.assert_close(pair.encode_image(pixels), image.encode_image(pixels))


def test_bad_axes_and_shares_are_named(setup):
    student = load_model(setup["student_dir"], teacher=setup["teacher"])
    dim = setup["teacher"].embed_dim
    with pytest.raises(ValueError, match=rf"axis must be a finite non-zero vector of {dim} values, got shape \(3,\)"):
        student.set_mean_share(torch.ones(3), 0.2)
    with pytest.raises(ValueError, match="finite non-zero"):
        student.set_mean_share(torch.zeros(dim), 0.2)
    with pytest.raises(ValueError, match=r"share=1.0; expected a number in \[0, 1\)"):
        student.set_mean_share(torch.ones(dim), 1.0)


def test_the_command_writes_a_student_with_the_teachers_mean(setup, tmp_path, capsys):
    data = f"{setup['data']}:train"
    out = main(["--student", str(setup["student_dir"]), "--out", str(tmp_path / "shared"), "--data", data,
                "--limit", "8"])
    mean = teacher_mean(setup["teacher"], [data], 8, 4)
    assert out["share"] == pytest.approx(float(mean.norm()), abs=1e-6) and 0 < out["share"] < 1
    loaded = load_model(tmp_path / "shared", teacher=setup["teacher"])
    torch.testing.assert_close(F.normalize(loaded.mean_axis, dim=0), F.normalize(mean, dim=0))
    assert "share" in capsys.readouterr().out
    # bad input: one error line, exit 2, nothing written
    assert cli(["--student", str(setup["student_dir"]), "--out", str(tmp_path / "shared"), "--data", data]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert cli(["--student", str(setup["teacher_dir"]), "--out", str(tmp_path / "t"), "--data", data]) == 2
    assert "is not an image-only student" in capsys.readouterr().err and not (tmp_path / "t").exists()
    assert cli(["--student", str(setup["student_dir"]), "--out", str(tmp_path / "m"), "--data",
                str(tmp_path / "nowhere")]) == 2
    assert not (tmp_path / "m").exists()
    # without --data the sources come from the student's training_config.yaml, which this one lacks: named
    assert cli(["--student", str(setup["student_dir"]), "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err
    assert "no training_config.yaml records what it was trained on" in err and "--data" in err
    assert not (tmp_path / "n").exists()


def test_training_through_the_share_refuses_streamed_data(setup):
    """student.mean_share takes seeded images of each source, which a stream cannot give: a named config error."""
    from distill.config import ConfigError, load_config
    from distill.student_init import set_teacher_mean_share

    student = build_student("test-tiny-resnet", teacher=setup["teacher"])
    cfg = load_config(None, [f"teacher.name_or_path={setup['teacher_dir']}", f"data.train={setup['data']}",
                             "data.streaming=true", "student.mean_share=true"])
    with pytest.raises(ConfigError, match="student.mean_share=true .* streamed or sharded data"):
        set_teacher_mean_share(cfg, setup["teacher"], student)
    assert student.mean_axis is None  # nothing set
    off = load_config(None, [f"teacher.name_or_path={setup['teacher_dir']}", f"data.train={setup['data']}"])
    assert set_teacher_mean_share(off, setup["teacher"], student) is None and student.mean_axis is None
