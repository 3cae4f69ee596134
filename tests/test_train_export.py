"""The trainer's steps around training: building a missing teacher first, and export + parity after."""

import json

import pytest

from clipcore.testing import make_tiny_clip
from distill.train import ParityGateError, main
from tests.datagen import write_labelled


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-export")
    teacher = make_tiny_clip(root / "teacher", seed=1)
    write_labelled(root / "data", n=32)
    (root / "empty.yaml").write_text("{}\n")
    return root, teacher


def _args(setup, tmp_path, *extra):
    root, teacher = setup
    return ["--config", str(root / "empty.yaml"), f"teacher.name_or_path={teacher}", f"data.train={root / 'data'}",
            "student.arch=test-tiny-vision", "optim.batch_size=8", "optim.warmup_steps=1", "optim.max_steps=2",
            "progress=false", "data.templates=simple", f"output_dir={tmp_path / 'out'}",
            f"cache.dir={tmp_path / 'cache'}", "export.enabled=true", "export.parity_limit=16",
            "export.variants=fp32,fp16,int8-dynamic", "export.bundle_precision=fp32", *extra]


def test_export_after_training_writes_parity_reports_and_a_bundle(setup, tmp_path):
    # An untrained student's int8 copy may disagree with it; the test is about the plumbing, so
    # the int8 gate is relaxed and the bundle is the fp32 one, which must pass its strict gate.
    metrics = main(_args(setup, tmp_path, "export.bundle_precision=fp32",
                         "export.gates=int8.min_agreement=0,int8.max_top1_drop=1"))
    export = tmp_path / "out" / "export"
    report = json.loads((export / "parity.json").read_text())
    assert report["passed"] and metrics["export/parity_passed"] is True
    assert {s["name"] for s in report["subjects"]} >= {"teacher", "student", "fp32", "fp16", "int8-dynamic"}
    assert report["data"]["num_images"] == 16
    assert (export / "parity.html").read_text().count("<svg") >= 2
    bundle = export / "bundle-fp32"
    manifest = json.loads((bundle / "manifest.json").read_text())["files"]
    fp32 = next(s for s in report["subjects"] if s["name"] == "fp32")
    assert manifest["image_encoder.onnx"]["sha256"] == fp32["sha256"]  # the gated file itself ships
    assert "certificate.json" in manifest and "parity.json" in manifest
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["export/parity_passed"] is True


def test_int8_static_bundle_is_calibrated_on_the_training_split(setup, tmp_path):
    root, _ = setup
    main(_args(setup, tmp_path, "export.variants=fp32,int8-static", "export.bundle_precision=int8-static",
               "export.calibration_limit=6",
               "export.gates=int8.min_agreement=0,int8.max_top1_drop=1,pipeline.min_agreement=0,pipeline.max_top1_drop=1",
               "export.bundle_text=true"))
    export = tmp_path / "out" / "export"
    report = json.loads((export / "parity.json").read_text())
    assert report["data"]["calibration"] == f"{root / 'data'}[train]"
    assert report["settings"]["calibration_limit"] == 6 and report["settings"]["calibration_seed"] == 0
    config = json.loads((export / "bundle-int8-static" / "config.json").read_text())
    assert config["precision"] == "int8-static" and config["certificate"] == "certificate.json"
    # export.bundle_text: the gated text encoder (int8 passed its relaxed gate) and tokenizer ship too
    assert config["text_encoder"]["variant"] == "text-int8"
    assert (export / "bundle-int8-static" / "tokenizer.json").is_file()


def test_a_failed_gate_stops_with_an_error_naming_the_report(setup, tmp_path):
    # No fp32 export can reach a cosine above 1: the gate must fail, and the student is still saved.
    with pytest.raises(ParityGateError, match="parity.md"):
        main(_args(setup, tmp_path, "export.variants=fp32", "export.gates=fp32.min_emb_cosine=1.5"))
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
    main(_args(setup, tmp_path, "export.variants=fp32", "export.gates=fp32.min_emb_cosine=1.5",
               "export.fail_on_gate=false", "output_dir=" + str(tmp_path / "out2")))


def test_missing_teacher_is_built_first_by_its_recipe(setup, tmp_path):
    root, teacher = setup
    recipe = tmp_path / "build_teacher.yaml"
    built = tmp_path / "teacher-build"
    # a contrastive fine-tune of the tiny CLIP stands in for the reference-teacher build
    recipe.write_text(f"mode: contrastive\ncontrastive:\n  model: {teacher}\ndata:\n  train: {root / 'data'}\n"
                      f"  templates: simple\noptim:\n  batch_size: 8\n  max_steps: 2\n  warmup_steps: 1\n"
                      f"progress: false\noutput_dir: {built}\ncache:\n  dir: {tmp_path / 'cache'}\n")
    args = _args(setup, tmp_path, f"teacher.name_or_path={built / 'final'}", f"teacher.build_recipe={recipe}",
                 "export.enabled=false")
    main(args)
    assert (built / "final" / "config.json").is_file() and (tmp_path / "out" / "final").is_dir()
    stamp = (built / "final" / "config.json").stat().st_mtime
    main(args)  # built already: not rebuilt
    assert (built / "final" / "config.json").stat().st_mtime == stamp


def test_missing_build_recipe_is_a_clear_error(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-recipe.yaml is not a file"):
        main(_args(setup, tmp_path, f"teacher.name_or_path={tmp_path / 'nope'}",
                   f"teacher.build_recipe={tmp_path / 'no-such-recipe.yaml'}"))
