"""Parity report: export round trip through the CLI, gates, skipped GPU variants, HTML/JSON output, bad input."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from clipcore.data import DataSpec
from clipcore.loading import load_teacher
from clipcore.testing import make_tiny_clip
from exports.parity import (
    DEFAULT_GATES,
    Gate,
    ParityInputError,
    ParitySettings,
    load_gates,
    main,
    mean_kl,
    precision_from_name,
    run_parity,
)
from exports.providers import ACCELERATED_VARIANTS, ProviderInfo
from students import build_student, load_student, save_student
from tests.conftest import require_shared
from tests.datagen import write_labelled

FAST = ["--threads", "1", "--warmup", "1", "--iters", "3", "--throughput-batch", "4", "--throughput-iters", "1",
        "--templates", "simple", "--batch-size", "16"]
FAST_SETTINGS = ParitySettings(templates="simple", threads=1, warmup=1, iters=3, throughput_batch=4,
                               throughput_iters=1, batch_size=16)
REPORT_KEYS = {"format", "version", "created", "passed", "failures", "teacher", "student", "data", "environment",
               "settings", "gates", "subjects"}
SUBJECT_KEYS = {"name", "runtime", "precision", "role", "status", "reason", "path", "size_bytes", "size_mb",
                "size_of", "params", "metrics", "latency", "gate", "checks"}
METRIC_KEYS = {"top1", "top5", "top1_drop", "agreement_teacher", "agreement_student", "kl_teacher", "kl_student",
               "emb_cos_min", "emb_cos_mean", "emb_max_abs_diff"}
CPU_ONLY = ProviderInfo(ort_providers=("CPUExecutionProvider",), cuda_devices=0, torch_cuda=False, tensorrt_version=None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny teacher (seed 1), a saved test-tiny CLIP student and image-only student, and a labelled set."""
    root = tmp_path_factory.mktemp("parity")
    teacher_dir = make_tiny_clip(root / "teacher", seed=1)
    teacher = load_teacher(str(teacher_dir))
    save_student(build_student("test-tiny", teacher=teacher), root / "student")
    save_student(build_student("test-tiny-resnet", teacher=teacher), root / "student-resnet")
    (root / "data").mkdir()
    write_labelled(root / "data", n=24)
    return {"root": root, "teacher": str(teacher_dir), "student": str(root / "student"),
            "student_resnet": str(root / "student-resnet"), "data": str(root / "data")}


def cli(setup, out: Path, *extra: str) -> int:
    return main(["--teacher", setup["teacher"], "--student", setup["student"], "--data", setup["data"],
                 "--split", "test", "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def round_trip(setup):
    """Every CPU precision plus the GPU variants; int8 gates relaxed (random tiny weights)."""
    out = setup["root"] / "out"
    code = cli(setup, out, "--gate", "int8.min_agreement=0", "--gate", "int8.max_top1_drop=none")
    return code, out, json.loads((out / "parity.json").read_text())


def by_name(report: dict) -> dict[str, dict]:
    return {s["name"]: s for s in report["subjects"]}


def test_cli_round_trip_passes_and_keeps_fp32(round_trip):
    code, out, report = round_trip
    assert code == 0 and report["passed"] and report["failures"] == []
    subjects = by_name(report)
    assert list(subjects)[:6] == ["teacher", "student", "fp32", "fp16", "int8-dynamic", "int8-static"]
    fp32 = subjects["fp32"]
    assert fp32["status"] == "kept" and fp32["gate"] == "fp32"
    assert {c["field"] for c in fp32["checks"]} == {"min_agreement", "max_emb_abs_diff"}
    assert all(c["passed"] for c in fp32["checks"])
    assert fp32["metrics"]["agreement_student"] == 1.0 and fp32["metrics"]["emb_max_abs_diff"] <= 1e-4
    for name in ("fp32", "fp16", "int8-dynamic", "int8-static"):
        assert subjects[name]["status"] == "kept" and Path(subjects[name]["path"]).is_file()
    assert subjects["student"]["status"] == subjects["teacher"]["status"] == "reference"
    # the variants' class head is the exported text encoder's, and it matches torch
    assert "text_encoder.fp32.onnx" in report["student"]["variant_class_embeddings"]
    assert report["student"]["variant_head_max_abs_diff"] < 1e-5
    assert report["data"]["num_images"] == 23 and report["data"]["num_failed"] == 1  # row 3 is corrupt


def test_json_schema(round_trip):
    _, out, report = round_trip
    json.loads((out / "parity.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert REPORT_KEYS <= set(report)
    assert set(report["gates"]) >= {"fp32", "fp16", "int8"}
    for s in report["subjects"]:
        assert SUBJECT_KEYS <= set(s), s["name"]
        if s["status"] != "skipped":
            assert set(s["metrics"]) == METRIC_KEYS
            assert {"p50_ms", "p95_ms", "throughput_ips"} == set(s["latency"])
            assert s["latency"]["p95_ms"] >= s["latency"]["p50_ms"] > 0 and s["params"] > 0 and s["size_bytes"] > 0
    assert by_name(report)["teacher"]["metrics"]["agreement_teacher"] == 1.0
    assert report["environment"]["cpu_int8_dot"]  # whose int8 kernels the verdicts hold for
    assert "CPU int8 dot product" in (out / "parity.md").read_text()


def test_a_rejected_int8_on_a_cpu_without_vnni_gets_a_hint():
    from exports.report import notes

    rows = [{"name": "int8", "precision": "int8-static", "status": "rejected", "reason": "agreement 70 %"},
            {"name": "fp32", "precision": "fp32", "status": "kept"}]
    saturating = {"subjects": rows, "environment": {"cpu_int8_dot": "avx2 without vnni: u8s8 int8 may saturate"}}
    assert len(notes(saturating)) == 2 and "int8: this CPU has no VNNI" in notes(saturating)[1]
    assert notes({"subjects": rows, "environment": {"cpu_int8_dot": "vnni (avx512_vnni)"}}) == ["int8: agreement 70 %"]
    kept = [dict(rows[0], status="kept", reason=None), rows[1]]
    assert notes({"subjects": kept, "environment": saturating["environment"]}) == []


def test_cpu_int8_dot_names_vnni_arm_dot_product_and_saturating_avx2():
    from exports.cpu_int8 import cpu_int8_dot

    assert cpu_int8_dot("flags\t: fpu sse avx2 avx512f avx512_vnni\n") == "vnni (avx512_vnni)"
    assert cpu_int8_dot("flags\t: fpu avx2 avx_vnni\n") == "vnni (avx_vnni)"
    assert cpu_int8_dot("Features\t: fp asimd asimddp\n") == "arm dot product (asimddp)"
    assert cpu_int8_dot("flags\t: fpu sse avx2 fma\n") == "avx2 without vnni: u8s8 int8 may saturate"
    assert cpu_int8_dot("processor\t: 0\n") == "unknown" and cpu_int8_dot("flags : sse2\n") == "none found"


def test_gpu_variants_are_skipped_with_a_reason_or_measured(round_trip):
    _, _, report = round_trip
    for name in ACCELERATED_VARIANTS:
        s = by_name(report)[name]
        if s["status"] == "skipped":  # this machine: no CUDA / TensorRT
            assert s["reason"].startswith("skipped: ") and len(s["reason"]) > 20
            assert s["metrics"] == {} and s["latency"] == {}  # never a made-up number
        else:
            assert set(s["metrics"]) == METRIC_KEYS


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def test_html_is_well_formed_self_contained_and_has_plots(round_trip):
    _, out, report = round_trip
    html = (out / "parity.html").read_text()
    root = ET.fromstring(html)  # well-formed XML, inline SVG included
    svgs = [e for e in root.iter() if e.tag.endswith("}svg")]
    assert len(svgs) == 3  # accuracy vs latency, agreement per variant, per-image KL / cosine histograms
    parser = _Collect()
    parser.feed(html)
    assert {"table", "svg", "figure"} <= set(parser.tags)
    assert "src=\"http" not in html and "href=\"http" not in html  # nothing fetched
    assert "skipped: " in html
    texts = {"".join(e.itertext()) for svg in svgs for e in svg.iter() if e.tag.endswith("}text")}
    assert {"Accuracy vs latency", "Agreement per variant (dashed: gate minimum)", "int8-static",
            "Per-image KL from the student", "Per-image embedding cosine"} <= texts
    ids = [e.get("id") for e in root.iter() if e.get("id")]
    assert len(ids) == len(set(ids))  # two inline SVGs share one id namespace
    md = (out / "parity.md").read_text()
    assert "| fp32 | onnxruntime-cpu | fp32 | kept |" in md and "PASSED" in md
    # the agreement gates carry the Wilson interval over the report's images: fp32 agrees on every one
    from clipcore.proportions import wilson_interval

    lo, _ = wilson_interval(1.0, report["data"]["num_images"])
    assert "| 95 % interval |" in md and f"| 100.00 % | {100 * lo:.2f}–100.00 % |" in md


def perturbed(src: Path, dst: Path, scale: float = 0.05) -> Path:
    """``src`` with Gaussian noise added to every float weight."""
    model = onnx.load(str(src))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.size > 1:
            noisy = arr + scale * (arr.std() + 1e-3) * rng.standard_normal(arr.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), init.name))
    onnx.save(model, str(dst))
    return dst


def test_perturbed_variant_fails_its_gate_and_cli_exits_1(setup, round_trip, tmp_path, capsys):
    _, out, _ = round_trip
    broken = perturbed(out / "onnx" / "image_encoder.fp32.onnx", tmp_path / "broken.onnx")
    code = cli(setup, tmp_path / "out", "--variants", "fp32", "--onnx", f"broken-fp32={broken}")
    err = capsys.readouterr().err
    assert code == 1
    assert "gate failed: broken-fp32: emb_max_abs_diff = " in err and "> 0.0001 (gate max_emb_abs_diff)" in err
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    subjects = by_name(report)
    assert subjects["broken-fp32"]["status"] == "rejected" and subjects["fp32"]["status"] == "kept"
    # agreement may fail too: whether noise flips a top-1 depends on the random tiny model's init
    assert not report["passed"] and any(f.startswith("broken-fp32: emb_max_abs_diff") for f in report["failures"])
    assert broken.is_file()  # files passed in with --onnx are never deleted
    html = (tmp_path / "out" / "parity.html").read_text()
    ET.fromstring(html)
    assert "FAILED" in html and "broken-fp32" in html


def test_strict_gate_rejects_and_removes_the_variant_file(setup, tmp_path):
    teacher = load_teacher(setup["teacher"])
    student = load_student(setup["student"], teacher=teacher)
    gates = {**DEFAULT_GATES, "int8-dynamic": Gate(min_agreement=1.0, max_emb_abs_diff=0.0)}
    report = run_parity(teacher, student, DataSpec(setup["data"], split="test"), tmp_path, variants=["int8-dynamic"],
                        gates=gates, settings=FAST_SETTINGS, provider_info=CPU_ONLY)
    result = report.subject("int8-dynamic")
    assert not report.passed and result.status == "rejected" and result.gate == "int8-dynamic"
    assert result.path is None and not (tmp_path / "onnx" / "image_encoder.int8-dynamic.onnx").exists()
    assert "(file removed)" in result.reason
    assert any(m.startswith("int8-dynamic: emb_max_abs_diff") for m in report.failures())
    assert (tmp_path / "onnx" / "image_encoder.fp32.onnx").is_file()  # the source of every variant stays


def test_image_only_student_uses_teacher_class_head_and_lists_skipped_gpu_variants(setup, tmp_path):
    teacher = load_teacher(setup["teacher"])
    student = load_student(setup["student_resnet"], teacher=teacher)
    report = run_parity(teacher, student, DataSpec(setup["data"], split="test"), tmp_path,
                        variants=["fp32", *ACCELERATED_VARIANTS], settings=FAST_SETTINGS, provider_info=CPU_ONLY)
    assert report.passed and report.subject("fp32").status == "kept"
    assert report.student["variant_class_embeddings"].startswith("teacher text tower")
    assert not report.student["own_text_tower"]
    reasons = {s["name"]: s["reason"] for s in report.to_dict()["subjects"] if s["status"] == "skipped"}
    assert set(reasons) == set(ACCELERATED_VARIANTS)
    assert reasons["ort-trt-fp16"] == ("skipped: onnxruntime has no TensorrtExecutionProvider (installed providers: "
                                      "CPUExecutionProvider); install onnxruntime-gpu and TensorRT")
    assert reasons["trt-fp16"].startswith("skipped: the tensorrt Python module is not installed")
    assert "skipped: onnxruntime has no CUDAExecutionProvider" in report.to_markdown()
    # the torch student's image tower only: the frozen teacher text side is not counted
    assert report.subject("student").params < report.subject("teacher").params


def test_skip_reasons_name_the_missing_piece():
    gpu_ort = ProviderInfo(("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"), 0, False, None)
    assert gpu_ort.skip_reason("ort-trt-fp16") == "no CUDA device is visible"
    with_gpu = ProviderInfo(gpu_ort.ort_providers, 1, False, "10.9.0")
    assert with_gpu.skip_reason("ort-cuda-fp32") is None and with_gpu.skip_reason("ort-trt-fp16") is None
    assert "torch has no CUDA" in with_gpu.skip_reason("trt-fp16")
    with pytest.raises(ValueError, match="unknown accelerated variant"):
        CPU_ONLY.skip_reason("fp16")


def tiny_image_graph(path: Path, hw: int, dim: int) -> Path:
    """A valid image-encoder-shaped ONNX file: mean-pooled pixels times a (3, dim) matrix."""
    from onnx import TensorProto, helper

    weight = numpy_helper.from_array(np.ones((3, dim), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["pixel_values"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["image_embeds"])],
        "tiny", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, hw, hw])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", dim])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def bert_dir(path: Path) -> Path:
    """A loadable Hugging Face model of an architecture that is not a dual encoder."""
    from transformers import BertConfig, BertModel

    from clipcore.testing import write_byte_tokenizer, write_processor_config

    BertModel(BertConfig(vocab_size=600, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8)).save_pretrained(path)
    write_byte_tokenizer(path)
    write_processor_config(path, 32)
    return path


BAD_INPUT_EXPECTED = {
    "not-a-model-dir": "--student {tmp}: not a model directory (has no student.json or config.json)",
    "teacher-not-a-model-dir": "--teacher {tmp}: not a model directory (has no config.json or dual_encoder.json)",
    "teacher-is-a-file": "--teacher {tmp}/gates.yaml: not a model directory (is a file)",
    "unsupported-architecture": "--teacher {tmp}/bert: not a usable CLIP-family model (TypeError: ",
    "unknown-student-kind": "--student {tmp}/weird: not a usable CLIP-family model (ValueError: ",
    "corrupt-onnx": "corrupt.onnx: not a valid ONNX",
    "onnx-not-an-image-encoder": "not a image_encoder graph: inputs ['x'] lack ['pixel_values']",
    "onnx-wrong-image-size": "input pixel_values has shape ['batch', 3, 64, 64]; the student takes (batch, 3, 32, 32)",
    "onnx-wrong-embed-dim": "output has shape ['batch', 7]; the student's embeddings are 16-dimensional",
    "missing-data": "does not exist",
    "unknown-variant": "unknown variants ['fp64']",
    "bad-gate": "--gate fp16.min_agreement: 'high' is not a number",
    "bad-templates": "templates 'no-placeholder'",
}


def bad_input_flags(case: str, tmp: Path) -> dict[str, str]:
    """The CLI flags that replace the good ones for one bad-input case (writing its files)."""
    if case == "corrupt-onnx":
        (tmp / "corrupt.onnx").write_bytes(b"\x08\x07 definitely not protobuf")
    if case == "onnx-not-an-image-encoder":
        from onnx import TensorProto, helper

        vi = helper.make_tensor_value_info
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                  [vi("x", TensorProto.FLOAT, [1])], [vi("y", TensorProto.FLOAT, [1])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp / "other.onnx"))
    if case == "unknown-student-kind":
        (tmp / "weird").mkdir()
        (tmp / "weird" / "student.json").write_text(json.dumps({"format_version": 1, "kind": "diffusion"}))
    if case == "teacher-is-a-file":
        (tmp / "gates.yaml").write_text("fp32: {}\n")
    if case == "unsupported-architecture":
        bert_dir(tmp / "bert")
    return {
        "not-a-model-dir": {"--student": str(tmp)},
        "teacher-not-a-model-dir": {"--teacher": str(tmp)},
        "teacher-is-a-file": {"--teacher": str(tmp / "gates.yaml")},
        "unsupported-architecture": {"--teacher": str(tmp / "bert")},
        "unknown-student-kind": {"--student": str(tmp / "weird")},
        "corrupt-onnx": {"--onnx": f"mine={tmp / 'corrupt.onnx'}"},
        "onnx-not-an-image-encoder": {"--onnx": f"mine={tmp / 'other.onnx'}"},
        "onnx-wrong-image-size": {"--onnx": f"mine={tiny_image_graph(tmp / 'big.onnx', 64, 16)}"},
        "onnx-wrong-embed-dim": {"--onnx": f"mine={tiny_image_graph(tmp / 'dim.onnx', 32, 7)}"},
        "missing-data": {"--data": str(tmp / "nowhere")},
        "unknown-variant": {"--variants": "fp32,fp64"},
        "bad-gate": {"--gate": "fp16.min_agreement=high"},
        "bad-templates": {"--templates": "no-placeholder"},
    }[case]


@pytest.mark.parametrize("case", list(BAD_INPUT_EXPECTED))
def test_bad_input_exits_2_with_a_clear_error(setup, tmp_path, capsys, case):
    flags = {"--teacher": setup["teacher"], "--student": setup["student"], "--data": setup["data"],
             "--out": str(tmp_path / "o")}
    flags.update(bad_input_flags(case, tmp_path))
    argv = [*FAST, *(x for item in flags.items() for x in item)]  # the case's flags win over FAST's
    capsys.readouterr()  # what building the bad input printed is not the CLI's output
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1  # one line, no traceback
    assert BAD_INPUT_EXPECTED[case].format(tmp=tmp_path) in err
    assert not (tmp_path / "o" / "parity.json").exists()


def nan_student(setup, path: Path) -> Path:
    """The test-tiny student with every weight NaN: what a diverged run saves."""
    import torch

    student = build_student("test-tiny", teacher=load_teacher(setup["teacher"]))
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(float("nan"))
    save_student(student, path)
    return path


@pytest.mark.parametrize("variants", ["int8-dynamic", "fp32,int8-dynamic"])
def test_nan_student_fails_with_a_reason_and_the_report_is_still_written(setup, tmp_path, capsys, variants):
    student = nan_student(setup, tmp_path / "nan-student")
    out = tmp_path / "out"
    code = main(["--teacher", setup["teacher"], "--student", str(student), "--data", setup["data"], "--split", "test",
                 "--out", str(out), "--variants", variants, *FAST])
    assert code == 1
    assert {p.name for p in out.glob("parity.*")} == {"parity.json", "parity.md", "parity.html"}
    report = json.loads((out / "parity.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert report["passed"] is False
    subjects = by_name(report)
    assert subjects["student"]["status"] == "error" and "non-finite" in subjects["student"]["reason"]
    assert subjects["teacher"]["status"] == "reference"  # the teacher is fine
    assert set(subjects["student"]["metrics"].values()) == {None}  # no made-up accuracy from NaN logits
    for name in variants.split(","):  # the int8 quantiser may refuse NaN weights: then an error
        assert subjects[name]["status"] in ("rejected", "error"), name
    if "fp32" in variants:
        assert subjects["fp32"]["status"] == "rejected" and "non-finite outputs" in subjects["fp32"]["reason"]
    assert any(f.startswith("student: error: non-finite outputs") for f in report["failures"])
    assert all(any(f.startswith(f"{name}: ") for f in report["failures"]) for name in variants.split(","))
    assert "FAILED" in (out / "parity.md").read_text()
    ET.fromstring((out / "parity.html").read_text())
    assert "gate failed: student: error: non-finite outputs" in capsys.readouterr().err


def test_gate_on_a_non_finite_metric_fails():
    check = Gate(max_kl=0.1).check({"kl_student": float("nan")})[0]
    assert not check.passed and "not finite" in check.describe()


def test_images_of_every_mode_run_through_every_subject(setup, tmp_path):
    """Grayscale, alpha, palette, 16-bit, CMYK and bilevel images all decode and agree across runtimes."""
    import datasets
    from PIL import Image

    from tests.datagen import png

    def encoded(i: int, mode: str) -> bytes:
        image = Image.open(io.BytesIO(png(i, size=(36, 28)))).convert("RGB")
        if mode == "I;16":  # a real 16-bit grayscale PNG
            image = Image.fromarray((np.asarray(image.convert("L"), np.uint16) * 257))
        else:
            image = image.convert(mode)
        if mode == "P":
            image.info["transparency"] = 0
        buf = io.BytesIO()
        image.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
        return buf.getvalue()

    modes = ["RGB", "L", "LA", "RGBA", "P", "I;16", "CMYK", "1"]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "car"])})
    rows = {"image": [{"bytes": encoded(i, m), "path": None} for i, m in enumerate(modes * 2)],
            "label": [i % 3 for i in range(2 * len(modes))]}
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(tmp_path / "data" / "test-00000-of-00001.parquet"))
    teacher = load_teacher(setup["teacher"])
    student = load_student(setup["student"], teacher=teacher)
    report = run_parity(teacher, student, DataSpec(str(tmp_path / "data"), split="test"), tmp_path / "out",
                        variants=["fp32"], settings=FAST_SETTINGS, provider_info=CPU_ONLY)
    assert report.data["num_images"] == 2 * len(modes) and report.data["num_failed"] == 0
    assert report.passed and report.subject("fp32").metrics["emb_max_abs_diff"] <= 1e-4


def test_gates_file_and_overrides(tmp_path):
    path = tmp_path / "gates.yaml"
    path.write_text("int8:\n  min_agreement: 0.98\n  max_top1_drop: null\nmy-onnx:\n  max_kl: 0.01\n")
    gates = load_gates(path, ["fp16.min_emb_cosine=0.999", "fp32.max_emb_abs_diff=none"], names=["my-onnx"])
    assert gates["int8"] == Gate(min_agreement=0.98)
    assert gates["my-onnx"] == Gate(max_kl=0.01)
    assert gates["fp16"] == Gate(min_agreement=0.995, min_emb_cosine=0.999)
    assert gates["fp32"] == Gate(min_agreement=1.0)
    assert load_gates() == DEFAULT_GATES
    with pytest.raises(ParityInputError, match="unknown gate fields"):
        load_gates(overrides=["int8.min_acc=1"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ParityInputError, match="unreadable gates file"):
        load_gates(tmp_path / "bad.json")


def test_gate_checks_tolerate_float_rounding_and_report_none():
    gate = Gate(min_agreement=0.99, max_top1_drop=0.01)
    checks = gate.check({"agreement_student": 0.99, "top1_drop": 0.95 - 0.94})  # 0.010000000000000009
    assert all(c.passed for c in checks)
    drop32 = float(np.float32(0.245) - np.float32(0.235))  # 0.0100000203: float32 accuracies of 200 images
    assert Gate(max_top1_drop=0.01).check({"top1_drop": drop32})[0].passed
    assert not Gate(max_top1_drop=0.01).check({"top1_drop": 0.015})[0].passed
    missing = Gate(max_emb_abs_diff=1e-4).check({"emb_max_abs_diff": None})[0]
    assert not missing.passed and "not measured" in missing.describe()
    failed = Gate(min_agreement=0.995).check({"agreement_student": 0.9826})[0]
    assert failed.describe() == "agreement_student = 98.26 % < 99.50 % (gate min_agreement)"


def test_metric_helpers():
    logp = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    assert mean_kl(logp, logp) == 0.0
    assert mean_kl(logp, logp[::-1]) > 0
    assert precision_from_name("broken-fp16") == "fp16" and precision_from_name("q-int8") == "int8-dynamic"
    assert precision_from_name("int8-static-v2") == "int8-static" and precision_from_name("mine") == "fp32"


@pytest.mark.slow
def test_cifar10_parity_on_shared_data(setup, tmp_path):
    """Real CIFAR-10 images and class names through the same pipeline (tiny random models)."""
    cifar = require_shared("cifar10")
    code = main(["--teacher", setup["teacher"], "--student", setup["student_resnet"], "--data", str(cifar),
                 "--split", "test", "--limit", "64", "--shuffle", "--variants", "fp32,fp16,int8-dynamic",
                 "--gate", "int8.min_agreement=0", "--gate", "int8.max_top1_drop=none", "--gate", "fp16.min_agreement=0.9",
                 "--out", str(tmp_path), *FAST])
    report = json.loads((tmp_path / "parity.json").read_text())
    assert code == 0 and report["data"]["num_images"] == 64 and report["data"]["num_classes"] == 10
    assert report["data"]["classnames"][:2] == ["airplane", "automobile"]
    assert by_name(report)["fp32"]["status"] == "kept"


def test_nan_teacher_gives_no_teacher_relative_metrics(setup, tmp_path):
    """Issue 28 item 8: agreement with a NaN teacher is the argmax of NaN logits (class 0), not a measurement."""
    import shutil

    import torch
    from transformers import CLIPModel

    shutil.copytree(setup["teacher"], tmp_path / "nan-teacher")
    model = CLIPModel.from_pretrained(setup["teacher"])
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan-teacher")
    teacher = load_teacher(str(tmp_path / "nan-teacher"))
    student = load_student(setup["student"], teacher=load_teacher(setup["teacher"]))
    report = run_parity(teacher, student, DataSpec(setup["data"], split="test"), tmp_path / "out",
                        variants=["fp32"], settings=FAST_SETTINGS, provider_info=CPU_ONLY)
    subjects = by_name(json.loads(report.to_json()))
    assert subjects["teacher"]["status"] == "error" and "non-finite" in subjects["teacher"]["reason"]
    for name in ("student", "fp32"):
        metrics = subjects[name]["metrics"]
        assert metrics["agreement_teacher"] is None and metrics["kl_teacher"] is None, (name, metrics)
        assert "teacher has non-finite outputs" in subjects[name]["reason"], name
        assert metrics["top1"] is not None  # what does not depend on the teacher is still measured
    assert subjects["fp32"]["status"] == "kept"  # the gates are against the student, which is fine
    assert report.passed is False  # the teacher's error still fails the report


@pytest.mark.parametrize("case", ["override", "file", "empty-variants", "text-file"])
def test_unknown_gate_keys_and_no_variants_are_errors(setup, tmp_path, capsys, case):
    """Issue 28 item 9: a misspelt gate key gated nothing and an empty variant list PASSED."""
    (tmp_path / "gates.yaml").write_text("int9:\n  min_agreement: 0.9\n")
    (tmp_path / "text.yaml").write_text("text-int8:\n  min_agreement: 0.9\nmine:\n  max_kl: 1\n")
    flags, expected = {
        "override": (["--gate", "fp23.min_agreement=1"], "--gate fp23.min_agreement=1: unknown gate key 'fp23'"),
        "file": (["--gates", str(tmp_path / "gates.yaml")], f"{tmp_path / 'gates.yaml'}: gate 'int9': unknown gate key"),
        "empty-variants": (["--variants", ""], "--variants '': the variant list is empty; expected some of"),
        # text-int8 is a text variant; mine is an --onnx name, but this run has no --onnx mine
        "text-file": (["--gates", str(tmp_path / "text.yaml")], "gate 'mine': unknown gate key 'mine'"),
    }[case]
    assert cli(setup, tmp_path / "o", *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and expected in err, err
    if case != "empty-variants":
        assert "fp32, fp16, int8, " in err and "int8-static" in err  # the valid keys
    assert not (tmp_path / "o").exists()  # refused before anything was exported
    with pytest.raises(ParityInputError, match="unknown gate keys"):
        run_parity(None, None, None, tmp_path / "o", variants=["fp32"], gates={"fp23": Gate(min_agreement=1.0)})


def test_onnx_names_are_gate_keys():
    assert load_gates(overrides=["mine.max_kl=1"], names=["mine"])["mine"] == Gate(max_kl=1.0)
