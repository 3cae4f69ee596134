"""ONNX export of the tiny CLIP: parity with torch, precision variants, optimum, bad inputs."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from clipcore.dual_encoder import HFDualEncoder, ModelNotFoundError
from clipcore.loading import load_dual_encoder
from clipcore.testing import tiny_clip_config
from clipcore.zeroshot import build_classifier, zeroshot_logits
from exports.interface import IMAGE_ENCODER, TEXT_ENCODER, ZERO_SHOT_CLASSIFIER
from exports.onnx_export import (
    ImageEncoderGraph,
    OptimumMissingError,
    TextEncoderGraph,
    compare_outputs,
    export_dual_encoder,
    export_optimum,
    export_text_encoder,
    export_zeroshot_classifier,
    graph_parity,
    optimize_onnx,
)
from exports.precision import (
    ArrayCalibrationReader,
    argmax_input_types,
    clamp_mask_constants,
    convert_fp16,
    load_onnx_model,
    make_variant,
    nonfinite_constants,
    quantize_int8_dynamic,
)
from exports.runtime import InvalidModelError, OnnxGraph, load_session

INTEGER_TYPES = {"INT32", "INT64"}


@pytest.fixture(scope="module")
def exported(tiny_clip, tmp_path_factory):
    return export_dual_encoder(tiny_clip, tmp_path_factory.mktemp("onnx"))


def pixels(n: int, seed: int = 0, side: int = 32) -> np.ndarray:
    return np.random.RandomState(seed).randn(n, 3, side, side).astype(np.float32)


def token_feeds(model, texts) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.tokenize(texts).items()}


def near_vocab_end(vocab_size: int, lengths=(6, 10, 3)) -> dict[str, np.ndarray]:
    """BOS, ids counting down from just below EOS, EOS, then EOS padding: a right-padded batch."""
    bos, eos = vocab_size - 2, vocab_size - 1
    seq = max(lengths) + 2
    ids = np.full((len(lengths), seq), eos, np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, 0] = bos
        ids[row, 1 : n + 1] = eos - 1 - (np.arange(n) * 3 + row) % 40  # ids in [eos-40, eos-1]
        mask[row, : n + 2] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_graphs_declare_interface_names_and_dynamic_batch(tiny_clip, exported):
    assert not any(m.training for m in tiny_clip.modules())  # export left the frozen teacher in eval mode
    for spec in (IMAGE_ENCODER, TEXT_ENCODER):
        session = load_session(exported[spec.name])
        assert [i.name for i in session.get_inputs()] == spec.input_names
        assert [o.name for o in session.get_outputs()] == spec.output_names
        assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic batch
    text_inputs = load_session(exported["text_encoder"]).get_inputs()
    assert all(isinstance(i.shape[1], str) for i in text_inputs)  # symbolic sequence


def test_fp32_round_trip_matches_torch(tiny_clip, exported):
    for batch in (1, 5):  # neither is the traced batch of 2
        diff = graph_parity(ImageEncoderGraph(tiny_clip), exported["image_encoder"], IMAGE_ENCODER,
                            {"pixel_values": pixels(batch, seed=batch)})["image_embeds"]
        assert diff.shape == (batch, tiny_clip.embed_dim)
        assert diff.max_abs_diff <= 1e-4, diff
    for texts in (["x"], ["a much longer sentence with many words in it", "b c", "dog"]):
        diff = graph_parity(TextEncoderGraph(tiny_clip), exported["text_encoder"], TEXT_ENCODER,
                            token_feeds(tiny_clip, texts))["text_embeds"]
        assert diff.max_abs_diff <= 1e-4, diff
    # the outputs are unit vectors, as encode_image/encode_tokens promise
    out = OnnxGraph(exported["image_encoder"], IMAGE_ENCODER).run({"pixel_values": pixels(3)})["image_embeds"]
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_onnxruntime_optimised_copy_agrees(exported, tmp_path):
    opt = optimize_onnx(exported["image_encoder"], tmp_path / "image_encoder.opt.onnx")
    feeds = {"pixel_values": pixels(2)}
    ref = OnnxGraph(exported["image_encoder"], IMAGE_ENCODER, optimization="disable").run(feeds)
    diff = compare_outputs(ref, OnnxGraph(opt, IMAGE_ENCODER).run(feeds))["image_embeds"]
    assert diff.max_abs_diff <= 1e-5


def test_fp16_text_encoder_near_vocab_end(tiny_clip, exported, tmp_path):
    fp32 = load_onnx_model(exported["text_encoder"])
    assert set(argmax_input_types(fp32).values()) <= INTEGER_TYPES
    assert clamp_mask_constants(fp32), "expected finfo.min attention-mask constants in the fp32 text graph"

    fp16_path = convert_fp16(exported["text_encoder"], tmp_path / "text_fp16.onnx")
    fp16 = onnx.load(str(fp16_path))
    types = argmax_input_types(fp16)
    assert types and set(types.values()) <= INTEGER_TYPES, types  # EOS pooling still on integer ids
    assert nonfinite_constants(fp16) == []
    assert any(i.data_type == TensorProto.FLOAT16 for i in fp16.graph.initializer)
    graph = OnnxGraph(fp16_path, TEXT_ENCODER)
    assert [i.type for i in graph.session.get_inputs()] == ["tensor(int64)", "tensor(int64)"]
    assert graph.session.get_outputs()[0].type == "tensor(float)"  # keep_io_types

    feeds = near_vocab_end(tiny_clip.model.config.text_config.vocab_size)
    diff = graph_parity(TextEncoderGraph(tiny_clip), fp16_path, TEXT_ENCODER, feeds)["text_embeds"]
    assert diff.finite and diff.min_cosine > 0.99, diff


def test_fp16_pools_eos_exactly_with_a_clip_sized_vocabulary(tiny_clip, tmp_path):
    """ids above 2048 are not exact in fp16 (49406 -> 49408 = fp16(49407)); pooling must stay integer."""
    from transformers import CLIPModel

    torch.manual_seed(1)
    clip = CLIPModel(tiny_clip_config(vocab_size=49408)).eval()
    model = HFDualEncoder(clip, None, tiny_clip.image_transform, name="tiny-clip-49408").eval()
    feeds = near_vocab_end(49408)
    tokens = {k: torch.from_numpy(v) for k, v in feeds.items()}
    fp32 = export_text_encoder(model, tmp_path / "text.onnx", tokens=tokens)
    fp16 = convert_fp16(fp32, tmp_path / "text_fp16.onnx")
    assert set(argmax_input_types(onnx.load(str(fp16))).values()) <= INTEGER_TYPES
    diff = graph_parity(TextEncoderGraph(model), fp16, TEXT_ENCODER, feeds)["text_embeds"]
    assert diff.min_cosine > 0.99, diff


def test_fp16_conversion_refuses_argmax_over_float_ids(tmp_path):
    # ids -> float -> ArgMax: the pattern that pools the wrong token once floats become fp16
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
         helper.make_node("ArgMax", ["ids_f"], ["pos"], axis=-1, keepdims=0)],
        "float_argmax",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("pos", TensorProto.INT64, ["batch"])],
    )
    src = tmp_path / "float_argmax.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    with pytest.raises(ValueError, match="ArgMax on floating-point"):
        convert_fp16(src, tmp_path / "out.onnx")


def test_fp16_image_encoder(tiny_clip, exported, tmp_path):
    path = make_variant(exported["image_encoder"], tmp_path / "image_fp16.onnx", "fp16")
    diff = graph_parity(ImageEncoderGraph(tiny_clip), path, IMAGE_ENCODER, {"pixel_values": pixels(3)})["image_embeds"]
    assert diff.finite and diff.min_cosine > 0.99, diff


def test_int8_dynamic_and_static(tiny_clip, exported, tmp_path):
    feeds = {"pixel_values": pixels(4, seed=7)}
    dyn = quantize_int8_dynamic(exported["image_encoder"], tmp_path / "image_int8_dynamic.onnx")
    assert any(n.op_type in ("DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul")
               for n in onnx.load(str(dyn)).graph.node)
    diff = graph_parity(ImageEncoderGraph(tiny_clip), dyn, IMAGE_ENCODER, feeds)["image_embeds"]
    assert diff.min_cosine > 0.9, diff

    text = quantize_int8_dynamic(exported["text_encoder"], tmp_path / "text_int8_dynamic.onnx")
    diff = graph_parity(TextEncoderGraph(tiny_clip), text, TEXT_ENCODER,
                        token_feeds(tiny_clip, ["a photo of a dog.", "cat"]))["text_embeds"]
    assert diff.min_cosine > 0.9, diff

    # calibrated QDQ; bundles calibrate on real images (tests/test_runtime.py), here on arrays
    calibration = ArrayCalibrationReader([{"pixel_values": pixels(4, seed=s)} for s in range(3)])
    static = make_variant(exported["image_encoder"], tmp_path / "image_int8_static.onnx", "int8-static", calibration)
    ops = {n.op_type for n in onnx.load(str(static)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    diff = graph_parity(ImageEncoderGraph(tiny_clip), static, IMAGE_ENCODER, feeds)["image_embeds"]
    assert diff.min_cosine > 0.9, diff
    with pytest.raises(ValueError, match="calibration"):
        make_variant(exported["image_encoder"], tmp_path / "x.onnx", "int8-static")


def test_fused_classifier_equals_torch_zeroshot(tiny_clip, tmp_path):
    head = build_classifier(tiny_clip, ["cat", "dog", "car", "tree"], "simple")
    path = export_zeroshot_classifier(tiny_clip, head, tmp_path / "zeroshot.onnx")
    feeds = {"pixel_values": pixels(3, seed=3)}
    out = OnnxGraph(path, ZERO_SHOT_CLASSIFIER).run(feeds)
    assert out["probs"].shape == (3, 4)
    with torch.no_grad():
        emb = tiny_clip.encode_image(torch.from_numpy(feeds["pixel_values"]))
        logits = zeroshot_logits(tiny_clip, emb, head)
    np.testing.assert_allclose(out["logits"], logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(out["probs"], logits.softmax(-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(out["probs"].sum(1), 1.0, atol=1e-5)
    # class embeddings and the scale are constants: the graph has a single input
    assert [i.name for i in load_session(path).get_inputs()] == ["pixel_values"]


@pytest.mark.parametrize("source", ["directory", "in-memory"])
def test_optimum_export_loads_in_ort_model_class(tiny_clip_dir, tmp_path, source):
    ort_models = pytest.importorskip(
        "optimum.onnxruntime", reason="optimum-onnx is the optional [optimum] extra (the compat environment has it)"
    )
    ORTModelForZeroShotImageClassification = ort_models.ORTModelForZeroShotImageClassification

    model = load_dual_encoder(str(tiny_clip_dir))  # a private copy: optimum patches the module it exports
    out = export_optimum(str(tiny_clip_dir) if source == "directory" else model, tmp_path / "optimum")
    ort_model = ORTModelForZeroShotImageClassification.from_pretrained(out)
    tokens = model.tokenize(["a photo of a cat.", "a diagram", "x"])
    px = torch.from_numpy(pixels(2, seed=5))
    result = ort_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=px)
    with torch.no_grad():
        image = model.encode_image(px)
        text = model.encode_tokens(tokens["input_ids"], tokens["attention_mask"])
        logits = model.logits(image, text)
    torch.testing.assert_close(torch.as_tensor(result.image_embeds), image, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.as_tensor(result.text_embeds), text, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.as_tensor(result.logits_per_image), logits, atol=1e-3, rtol=0)
    assert (out / "preprocessor_config.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_optimum_export_rejects_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        export_optimum(tmp_path, tmp_path / "out")


def test_export_optimum_without_the_extra_says_how_to_install_it(tiny_clip_dir, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "optimum" or m.startswith("optimum.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "optimum", None)  # any import of optimum now raises ImportError
    with pytest.raises(OptimumMissingError, match=r"pip install -e '\.\[optimum\]'"):
        export_optimum(str(tiny_clip_dir), tmp_path / "out")
    # the torch exporter does not need it (with optimum blocked, any import of it would raise)
    paths = export_dual_encoder(load_dual_encoder(str(tiny_clip_dir)), tmp_path / "plain")
    assert paths["image_encoder"].is_file() and paths["text_encoder"].is_file()


def test_corrupt_or_missing_onnx_files_give_clear_errors(exported, tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf model" * 10)
    with pytest.raises(InvalidModelError, match="broken.onnx"):
        load_session(bad)
    with pytest.raises(InvalidModelError, match="broken.onnx"):
        load_onnx_model(bad)
    with pytest.raises(InvalidModelError, match="broken.onnx"):
        quantize_int8_dynamic(bad, tmp_path / "q.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported["image_encoder"].read_bytes()[:2000])
    with pytest.raises(InvalidModelError, match="truncated.onnx"):
        load_session(truncated)
    with pytest.raises(InvalidModelError, match="is a directory"):
        load_session(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        load_session(tmp_path / "missing.onnx")
    with pytest.raises(InvalidModelError, match="not a text_encoder graph"):
        OnnxGraph(exported["image_encoder"], TEXT_ENCODER)


def test_image_only_student_exports_through_the_dual_encoder_interface(tiny_clip, tmp_path):
    """Not a transformers CLIPModel: a CNN image tower with the teacher's frozen text tower."""
    from students.factory import build_student

    student = build_student("test-tiny-resnet", teacher=tiny_clip, image_size=32).train()
    paths = export_dual_encoder(student, tmp_path)
    assert student.training  # export restores the caller's mode
    diff = graph_parity(ImageEncoderGraph(student), paths["image_encoder"], IMAGE_ENCODER,
                        {"pixel_values": pixels(3)})["image_embeds"]
    assert diff.max_abs_diff <= 1e-4, diff
    diff = graph_parity(TextEncoderGraph(student), paths["text_encoder"], TEXT_ENCODER,
                        token_feeds(student, ["a dog", "x"]))["text_embeds"]
    assert diff.max_abs_diff <= 1e-4, diff
    with pytest.raises(TypeError, match="HFDualEncoder"):
        export_optimum(student, tmp_path / "optimum")
