"""Bundles built from a parity run: the gated bytes ship, with their certificate; int8 is int8."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from distill.config import ConfigError, load_config
from clipcore.data import DataSpec
from clipcore.loading import load_teacher
from clipcore.testing import make_tiny_clip
from exports.gated_bundle import GatedBundleError, bundle_from_parity
from exports.int8_scheme import choose_int8_scheme
from exports.onnx_export import export_image_encoder
from exports.parity import DEFAULT_GATES, Gate, ParitySettings, run_parity
from exports.predict import main as predict_main
from exports.providers import ProviderInfo
from exports.runtime import OnnxGraph, load_bundle, sha256_file
from exports.interface import IMAGE_ENCODER
from students import build_student
from tests.datagen import write_labelled

FAST = ParitySettings(templates="simple", threads=1, warmup=0, iters=1, throughput_batch=2, throughput_iters=1,
                      batch_size=16, calibration_limit=8)
CPU_ONLY = ProviderInfo(ort_providers=("CPUExecutionProvider",), cuda_devices=0, torch_cuda=False, tensorrt_version=None)
LOOSE_INT8 = {**DEFAULT_GATES, "int8": Gate(min_agreement=0.0)}  # random tiny weights: plumbing, not accuracy


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A parity run of a tiny ResNet student (fp32 and the auto int8) with the report written."""
    root = tmp_path_factory.mktemp("gated")
    teacher = load_teacher(str(make_tiny_clip(root / "teacher", seed=1)))
    student = build_student("test-tiny-resnet", teacher=teacher)
    write_labelled(root / "data", n=24)
    out = root / "export"
    report = run_parity(teacher, student, DataSpec(str(root / "data"), split="test"), out, variants=["fp32", "int8"],
                        gates=LOOSE_INT8, settings=FAST, provider_info=CPU_ONLY)
    report.write(out)
    return {"root": root, "out": out, "report": json.loads((out / "parity.json").read_text()),
            "teacher": teacher, "student": student}


def subject(report: dict, name: str) -> dict:
    return next(s for s in report["subjects"] if s["name"] == name)


def test_bundle_ships_the_gated_bytes_and_head(run):
    out, report = run["out"], run["report"]
    int8 = subject(report, "int8")
    assert int8["status"] == "kept" and int8["precision"] == "int8-static"  # a CNN: static QDQ
    assert "convolutions hold" in int8["reason"]
    bundle = bundle_from_parity(out, "int8", out / "bundle-int8")
    manifest = json.loads((bundle / "manifest.json").read_text())["files"]
    assert manifest["image_encoder.onnx"]["sha256"] == int8["sha256"] == sha256_file(out / "onnx" / "image_encoder.int8.onnx")
    head = report["student"]["variant_class_head"]
    assert manifest["text_embeddings.npy"]["sha256"] == head["sha256"] == sha256_file(out / head["file"])
    # the certificate and the report travel under the manifest
    assert manifest["parity.json"]["sha256"] == sha256_file(out / "parity.json")
    cert = json.loads((bundle / "certificate.json").read_text())
    assert cert["sha256"]["image_encoder"] == int8["sha256"] and cert["variant"] == "int8"
    assert cert["data"]["num_images"] == report["data"]["num_images"] == 23
    assert cert["gate"]["name"] == "int8" and cert["gate"]["checks"][0]["field"] == "min_agreement"
    assert cert["student_top1"] == subject(report, "student")["metrics"]["top1"]
    config = json.loads((bundle / "config.json").read_text())
    assert config["precision"] == "int8-static" and config["variant"] == "int8"
    assert config["fingerprint"] == run["student"].fingerprint()
    # and it classifies exactly as the gated file did
    clf = load_bundle(bundle, threads=1)
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    gated = OnnxGraph(out / "onnx" / "image_encoder.int8.onnx", IMAGE_ENCODER, threads=1).run({"pixel_values": pixels})
    shipped = clf.image_encoder.run({"pixel_values": pixels})
    np.testing.assert_array_equal(gated["image_embeds"], shipped["image_embeds"])
    assert clf.classnames == report["data"]["classnames"] and clf.certificate == cert


def test_predict_info_prints_the_certificate(run, capsys):
    bundle = bundle_from_parity(run["out"], "fp32", run["root"] / "bundle-fp32")
    assert predict_main([str(bundle), "--info"]) == 0
    text = capsys.readouterr().out
    assert "certificate: variant fp32 (fp32) kept" in text and "23 images" in text
    assert "min_agreement: agreement_student = 1 >= 1  pass" in text
    assert predict_main([str(bundle), "--info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["certificate"]["gate"]["name"] == "fp32" and info["config"]["variant"] == "fp32"


def test_a_file_changed_after_gating_or_a_rejected_variant_does_not_ship(run, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(run["out"], copy, ignore=shutil.ignore_patterns("bundle-*"))
    model = onnx.load(str(copy / "onnx" / "image_encoder.fp32.onnx"))
    model.doc_string = "edited"
    onnx.save(model, str(copy / "onnx" / "image_encoder.fp32.onnx"))
    with pytest.raises(GatedBundleError, match="image_encoder.fp32.onnx: sha256 .* changed after it was gated"):
        bundle_from_parity(copy, "fp32", tmp_path / "b")
    report = json.loads((copy / "parity.json").read_text())
    subject(report, "int8")["status"] = "rejected"
    (copy / "parity.json").write_text(json.dumps(report))
    with pytest.raises(GatedBundleError, match="variant 'int8' was rejected"):
        bundle_from_parity(copy, "int8", tmp_path / "b")
    with pytest.raises(GatedBundleError, match="no variant 'fp16'"):
        bundle_from_parity(copy, "fp16", tmp_path / "b")
    (copy / "onnx" / "image_encoder.fp32.onnx").unlink()  # and the path recorded for it leads nowhere either
    subject(report, "fp32")["path"] = str(tmp_path / "gone" / "image_encoder.fp32.onnx")
    (copy / "parity.json").write_text(json.dumps(report))
    with pytest.raises(GatedBundleError, match=r"image_encoder.fp32.onnx: missing \(.*parity.json subject 'fp32' lists it\)"):
        bundle_from_parity(copy, "fp32", tmp_path / "b")
    del report["student"]["variant_class_head"]
    (copy / "parity.json").write_text(json.dumps(report))
    with pytest.raises(GatedBundleError, match="written by an older exports.parity without the class head"):
        bundle_from_parity(copy, "fp32", tmp_path / "b")
    (copy / "parity.json").write_text('{"student": ')
    with pytest.raises(GatedBundleError, match=r"parity.json: unreadable JSON \(JSONDecodeError"):
        bundle_from_parity(copy, "fp32", tmp_path / "b")
    (copy / "parity.json").unlink()
    with pytest.raises(FileNotFoundError, match="no parity report"):
        bundle_from_parity(copy, "fp32", tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_int8_picks_static_qdq_for_cnns_and_dynamic_for_transformers(run, tmp_path):
    cnn = run["out"] / "onnx" / "image_encoder.fp32.onnx"
    assert choose_int8_scheme(cnn)[0] == "int8-static"
    vit = export_image_encoder(build_student("test-tiny-vision", teacher=run["teacher"]), tmp_path / "vit.onnx")
    assert choose_int8_scheme(vit)[0] == "int8-dynamic"
    # "int8" means int8: every convolution of the shipped CNN reads int8 weights
    model = onnx.load(str(run["out"] / "onnx" / "image_encoder.int8.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs
    for conv in convs:
        dq = producers[conv.input[1]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == TensorProto.INT8, conv.name
    float_weights = sum(int(np.prod(i.dims)) for i in model.graph.initializer
                        if i.data_type == TensorProto.FLOAT and len(i.dims) >= 2)
    assert float_weights == 0  # no fp32 weight matrix or kernel left


def test_bundle_precision_must_be_a_gated_variant():
    base = ["teacher.name_or_path=t", "data.train=d", "export.enabled=true"]
    with pytest.raises(ConfigError, match=r"export.bundle_precision='int8' is not in export.variants=\['fp32', 'fp16'\]"):
        load_config(None, base + ["export.variants=fp32,fp16"])
    assert load_config(None, base + ["export.variants=fp32", "export.bundle_precision=null"]).export.bundle_precision is None
    with pytest.raises(ConfigError, match="export.calibration_limit"):
        load_config(None, base + ["export.calibration_limit=0"])


def test_w8a16_and_fp16_numerics_for_a_transformer_student(run, tmp_path):
    """w8a16 (int8 weights, 16-bit activation QDQ) is gated like int8; the fp16 graph keeps its
    LayerNorms, softmaxes and reductions in fp32, and the report says so."""
    teacher = run["teacher"]
    student = build_student("test-tiny-vision", teacher=teacher)
    report = run_parity(teacher, student, DataSpec(str(run["root"] / "data"), split="test"), tmp_path,
                        variants=["fp16", "w8a16"], gates=LOOSE_INT8, settings=FAST, provider_info=CPU_ONLY)
    w8 = report.subject("w8a16")
    assert w8.status == "kept" and w8.gate == "int8" and w8.precision == "w8a16"
    model = onnx.load(str(tmp_path / "onnx" / "image_encoder.w8a16.onnx"))
    q_types = {inits.data_type for inits in model.graph.initializer if inits.name.endswith("_zero_point")}
    assert TensorProto.UINT16 in q_types and TensorProto.INT8 in q_types  # 16-bit activations, int8 weights
    assert w8.metrics["emb_cos_min"] > 0.99
    fp16 = report.subject("fp16")
    assert fp16.fp16_numerics["all_fp32"] and fp16.fp16_numerics["ops"]["Softmax"]["fp32"] >= 2
    assert "fp16 numerics: all kept in fp32" in fp16.reason and "LayerNormalization" in fp16.reason
    md = report.to_markdown()
    assert "fp16: fp16 numerics: all kept in fp32 (LayerNormalization" in md
    # a graph converted without the block list runs them in fp16, and the check says so
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from exports.fp16_check import describe, fp32_islands

    naive = convert_float_to_float16(onnx.load(str(tmp_path / "onnx" / "image_encoder.fp32.onnx")), keep_io_types=True,
                                     op_block_list=[])
    onnx.save(naive, str(tmp_path / "naive.onnx"))
    check = fp32_islands(tmp_path / "naive.onnx")
    assert not check["all_fp32"] and "SOME RUN IN FP16" in describe(check)


def test_the_certificate_binds_the_shipped_encoder(run, tmp_path, capsys):
    """Issue 28, item 6: an encoder swapped for another valid ONNX with the manifest re-hashed still
    verifies against the manifest, but it is not the file the certificate vouches for."""
    from exports.runtime import BundleError, write_manifest

    bundle = bundle_from_parity(run["out"], "fp32", tmp_path / "bundle")
    assert predict_main([str(bundle), "--info"]) == 0
    assert "the shipped image_encoder.onnx, text_embeddings.npy, parity.json have the sha256 this certificate names" \
        in capsys.readouterr().out
    shutil.copyfile(run["out"] / "onnx" / "image_encoder.int8.onnx", bundle / "image_encoder.onnx")  # valid, other
    files = list(json.loads((bundle / "manifest.json").read_text())["files"])
    write_manifest(bundle, files)  # the manifest now vouches for the new bytes
    with pytest.raises(BundleError, match=r"image_encoder.onnx: sha256 .* is not the .* that certificate.json "
                                          r"certifies"):
        load_bundle(bundle, threads=1)
    assert predict_main([str(bundle), "--info"]) == 2
    err = capsys.readouterr()
    assert "image_encoder.onnx" in err.err and "certificate" not in err.out


def test_an_export_replaces_the_whole_directory_and_a_failed_gate_leaves_no_bundle(run, tmp_path, monkeypatch):
    """Issue 28, item 2: run A's bundle stayed beside run B's failed parity.json (a deploy script
    would ship A). The export is built beside export/ and renamed into place whole."""
    from exports import pipeline

    monkeypatch.setattr(pipeline, "ParitySettings", lambda **kw: FAST.__class__(**{**FAST.__dict__, **kw}))
    monkeypatch.setattr(pipeline, "run_parity", lambda *a, **kw: run_parity(*a, **kw, provider_info=CPU_ONLY))
    spec, out = DataSpec(str(run["root"] / "data"), split="test"), tmp_path / "export"

    def export(**gates):
        return pipeline.export_and_check(run["teacher"], run["student"], spec, out, variants=["fp32"],
                                         templates="simple", bundle_precision="fp32", gates=gates)

    first = export()
    assert first.passed and first.bundle == out / "bundle-fp32" and load_bundle(first.bundle, threads=1)
    (out / "onnx" / "left-by-run-a.onnx").write_bytes(b"x")
    second = export(fp32={"min_emb_cosine": 1.5})  # no export reaches a cosine above 1: the gate fails
    assert not second.passed and second.bundle is None
    assert not json.loads((out / "parity.json").read_text())["passed"]
    assert not list(out.glob("bundle-*")) and not (out / "onnx" / "left-by-run-a.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no .tmp-export or .old-export left
    assert all(str(out) in (s["path"] or str(out)) for s in json.loads((out / "parity.json").read_text())["subjects"])
