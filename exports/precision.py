"""Precision variants of an exported fp32 graph: fp16, int8 dynamic and int8 static (QDQ).

Works on ONNX files with onnx and onnxruntime only (no torch), so the same functions serve the
exporter, the bundle writer and the parity report. Each variant keeps the fp32 graph's input and
output names and types: callers feed float32 pixels / int64 ids and read float32 embeddings.

Two fp16 hazards in CLIP-style text towers are handled explicitly:

* EOS pooling takes an ``ArgMax`` over token ids. If that ran on fp16 values, ids above 2048
  would round (49407 -> 49408 in CLIP's vocabulary) and pool the wrong token. transformers casts
  the ids to int32 before the argmax; :func:`convert_fp16` checks the converted graph still does.
* Attention masks are built from ``torch.finfo(float32).min`` (-3.4e38). The converter clips that
  to -65504, so the fp16 sum of the causal and the padding mask overflows to -inf; a fully masked
  row then depends on how a kernel treats all -inf (NaN from ``x - max`` in some, fused attention
  included). Those constants are clamped to ``mask_floor`` (-1e4) first, which keeps every mask
  value and sum finite and still gives masked positions zero weight. (onnxruntime's CPU kernels
  happen to survive the unclamped graph on the tiny test model; the clamp is defensive.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from clipcore.imaging import ImageTransform, decode_image
from exports.cpu_int8 import cpu_int8_dot, saturates
from exports.int8_scheme import AUTO_INT8, resolve_precision
from exports.interface import IMAGE_ENCODER
from exports.qat_ranges import ActivationRanges
from exports.runtime import InvalidModelError

PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static")
W8A16 = "w8a16"  # int8 weights, 16-bit activations (QDQ): for transformers where dynamic int8 loses agreement
# what make_variant and write_bundle take: the concrete schemes, "w8a16", and "int8", which picks one per graph
VARIANT_PRECISIONS = (*PRECISIONS, W8A16, AUTO_INT8)
CALIBRATED = ("int8-static", W8A16)  # the precisions that need calibration data

# Numerically sensitive ops stay fp32 (inputs cast up, outputs cast down): reductions, norms,
# exponentials, and anything that consumes integer-like values.
FP16_OP_BLOCK_LIST = sorted(
    set(DEFAULT_OP_BLOCK_LIST)
    | {"LayerNormalization", "Softmax", "ReduceL2", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Exp", "Log",
       "ArgMax", "ArgMin"}
)
FP16_MAX = 65504.0
_INT_TYPES = {TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
              TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64, TensorProto.BOOL}


def load_onnx_model(path: str | Path, check: bool = True) -> onnx.ModelProto:
    """Load (and by default ``onnx.checker``-validate) an ONNX file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        InvalidModelError: ``path`` is a directory, not a protobuf ONNX model, or fails the checker.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    if path.is_dir():
        raise InvalidModelError(f"{path}: is a directory, not an .onnx model file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, onnx's own errors for truncated external data
        raise InvalidModelError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {exc})") from exc
    if check:
        check_model(model, source=str(path))
    return model


def check_model(model: onnx.ModelProto, source: str = "<model>") -> None:
    """``onnx.checker.check_model`` with full shape checks; errors name ``source``."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InvalidModelError(f"{source}: fails onnx.checker ({exc})") from exc


def _float_constants(model: onnx.ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """Every tensor baked into the top-level graph: initializers and Constant/ConstantOfShape values."""
    for init in model.graph.initializer:
        yield init.name, init
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield f"{node.name or node.op_type}.{attr.name}", attr.t


def clamp_mask_constants(model: onnx.ModelProto, floor: float = -1e4) -> list[str]:
    """Replace float constants below -65504 (``finfo(float32).min``, -inf) with ``floor`` in place.

    Returns the names of the changed tensors.
    """
    changed = []
    for name, tensor in _float_constants(model):
        if tensor.data_type != TensorProto.FLOAT:
            continue
        arr = numpy_helper.to_array(tensor)
        if arr.size and (arr < -FP16_MAX).any():
            tensor.CopyFrom(numpy_helper.from_array(np.where(arr < -FP16_MAX, np.float32(floor), arr), tensor.name))
            changed.append(name)
    return changed


def nonfinite_constants(model: onnx.ModelProto) -> list[str]:
    """Names of float constants holding inf or NaN (what breaks fp16 attention masks)."""
    bad = []
    for name, tensor in _float_constants(model):
        if tensor.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            arr = numpy_helper.to_array(tensor)
            if arr.size and not np.isfinite(arr).all():
                bad.append(name)
    return bad


def argmax_input_types(model: onnx.ModelProto) -> dict[str, str]:
    """``{ArgMax node name: element type of its input}`` after shape inference (e.g. ``INT32``)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return {
        n.name: TensorProto.DataType.Name(types.get(n.input[0], TensorProto.UNDEFINED))
        for n in inferred.graph.node
        if n.op_type in ("ArgMax", "ArgMin")
    }


def convert_fp16(
    src: str | Path,
    dst: str | Path,
    *,
    op_block_list: Sequence[str] = FP16_OP_BLOCK_LIST,
    node_block_list: Sequence[str] = (),
    mask_floor: float = -1e4,
) -> Path:
    """fp16 weights and activations with float32 inputs/outputs (``keep_io_types``).

    Raises:
        ValueError: the converted graph takes an ArgMax over non-integer values (token pooling
            would round ids) or still holds inf/NaN constants.
    """
    model = load_onnx_model(src)
    clamp_mask_constants(model, mask_floor)
    model = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(op_block_list), node_block_list=list(node_block_list)
    )
    # the converter appends its Cast nodes at the end; onnx.checker wants topological order
    OnnxModel.graph_topological_sort(model.graph, is_deterministic=True)
    float_argmax = {k: v for k, v in argmax_input_types(model).items() if TensorProto.DataType.Value(v) not in _INT_TYPES}
    if float_argmax:
        raise ValueError(
            f"{src}: fp16 graph runs ArgMax on floating-point inputs {float_argmax}; EOS pooling over token ids "
            "must stay integer (ids above 2048 are not exact in fp16)"
        )
    bad = nonfinite_constants(model)
    if bad:
        raise ValueError(f"{src}: fp16 graph holds inf/NaN constants {bad[:5]}")
    check_model(model, source=f"{dst} (fp16 of {src})")
    onnx.save(model, str(dst))
    return Path(dst)


_QTYPES = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8, "qint16": QuantType.QInt16,
           "quint16": QuantType.QUInt16}


def _qtype(name: str) -> QuantType:
    try:
        return _QTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"quantisation type {name!r}; expected one of {sorted(_QTYPES)}") from None


@contextmanager
def _quantization_input(src: str | Path) -> Iterator[Path]:
    """``src`` after onnxruntime's recommended pre-processing (folding, fusions, shape inference).

    The symbolic shape pass is skipped: it cannot follow the Expand of transformers' attention
    masks, and onnx's own shape inference (which runs) is enough for the quantiser.
    """
    load_onnx_model(src)  # clear error for a corrupt input before the quantiser's own
    with tempfile.TemporaryDirectory(prefix="clip-quant-") as tmp:
        out = Path(tmp) / "preprocessed.onnx"
        quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
        yield out


def quantize_int8_dynamic(
    src: str | Path,
    dst: str | Path,
    *,
    weight_type: str = "qint8",
    op_types: Sequence[str] = ("MatMul", "Gemm"),
    nodes_to_exclude: Sequence[str] = (),
    per_channel: bool = True,
    embedding_tables: bool = True,
) -> Path:
    """Weights int8, activations quantised on the fly; no calibration data.

    ``per_channel``: one weight scale per output column. One scale per matrix let a few large
    columns set the step of all: the text student's int8 head agreed 97.0 % with fp32 that way,
    99.1 % per channel, at the same size and speed (docs/edge-bundle.md).

    Only matmuls with a constant weight are quantised: the attention score / context matmuls
    multiply two activations, and quantising those costs most of the accuracy for little speed.
    ``embedding_tables``: also store token-embedding tables in int8 per row
    (:func:`quantize_embedding_tables`), which onnxruntime's quantiser leaves fp32.
    """
    with _quantization_input(src) as pre:
        quantize_dynamic(
            str(pre), str(dst),
            op_types_to_quantize=list(op_types),
            per_channel=per_channel,
            weight_type=_qtype(weight_type),
            nodes_to_exclude=list(nodes_to_exclude),
            extra_options={"MatMulConstBOnly": True},
        )
    if embedding_tables:
        model = onnx.load(str(dst))
        if quantize_embedding_tables(model):
            check_model(model, source=f"{dst} (int8 embedding tables)")
            onnx.save(model, str(dst))
    return Path(dst)


EMBEDDING_MIN_ELEMENTS = 1 << 16  # smaller Gather tables (positions, token types) stay fp32: a few KB


def quantize_embedding_tables(model: onnx.ModelProto, min_elements: int = EMBEDDING_MIN_ELEMENTS) -> list[str]:
    """Store each large float table read by a row ``Gather`` (axis 0) as int8 with one scale per row; in place.

    A text encoder's token table is most of its weights (MiniLM: 30,522 x 384, 47 MB of 87) and no
    onnxruntime quantiser touches it: ``Gather`` has no integer kernel to route it through. Here
    ``Gather(table, ids)`` becomes ``Gather(int8 table, ids) * Gather(row scales, ids)``: a quarter
    of the bytes, and each looked-up row is its own symmetric int8 (``max|row| / 127``), so a rare
    token with small values keeps its precision. Returns the names of the replaced tables.
    """
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    done, nodes = [], []
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (table is None or table.data_type != TensorProto.FLOAT or len(table.dims) != 2 or axis != 0
                or int(np.prod(table.dims)) < min_elements or uses.get(table.name, 0) != 1):
            nodes.append(node)
            continue
        nodes.extend(_int8_gather(model, node, numpy_helper.to_array(table)))
        model.graph.initializer.remove(table)
        done.append(table.name)
    if done:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return done


def _int8_gather(model: onnx.ModelProto, node: onnx.NodeProto, table: np.ndarray) -> list[onnx.NodeProto]:
    name, ids, out = node.input[0], node.input[1], node.output[0]
    label = node.name or f"{name}_gather"
    scale = (np.abs(table).max(axis=1, keepdims=True) / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
    model.graph.initializer.extend([numpy_helper.from_array(q, f"{name}_int8"),
                                    numpy_helper.from_array(scale, f"{name}_row_scale")])
    # names of their own: onnxruntime's dynamic quantiser already names a MatMul input's scale "<input>_scale"
    q_out, s_out, f_out = f"{out}_rowq_int8", f"{out}_rowq_scale", f"{out}_rowq_float"
    return [helper.make_node("Gather", [f"{name}_int8", ids], [q_out], axis=0, name=f"{label}_int8"),
            helper.make_node("Gather", [f"{name}_row_scale", ids], [s_out], axis=0, name=f"{label}_scale"),
            helper.make_node("Cast", [q_out], [f_out], to=TensorProto.FLOAT, name=f"{label}_cast"),
            helper.make_node("Mul", [f_out, s_out], [out], name=f"{label}_dequant")]


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds precomputed input dicts (``{input name: array}``) to the calibrator; rewindable."""

    def __init__(self, batches: Iterable[Mapping[str, np.ndarray]] | Callable[[], Iterable[Mapping[str, np.ndarray]]]):
        self._source = batches if callable(batches) else (lambda b=list(batches): b)
        self._iter: Iterator[Mapping[str, np.ndarray]] = iter(self._source())

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {k: np.ascontiguousarray(v) for k, v in batch.items()}

    def rewind(self) -> None:
        self._iter = iter(self._source())


class ImageCalibrationReader(ArrayCalibrationReader):
    """Decodes and preprocesses real images lazily, ``batch_size`` at a time.

    Args:
        images: anything :func:`clipcore.imaging.decode_image` accepts (paths, bytes, PIL images,
            datasets ``Image`` dicts), in any PIL mode.
        transform: the model's preprocessing, the same one the runtime applies.
    """

    def __init__(self, images: Sequence[Any], transform: ImageTransform, batch_size: int = 8,
                 input_name: str = IMAGE_ENCODER.inputs[0].name):
        if len(images) == 0:
            raise ValueError("static int8 quantisation needs at least one calibration image")
        images = list(images)

        def batches() -> Iterator[dict[str, np.ndarray]]:
            for i in range(0, len(images), batch_size):
                chunk = images[i : i + batch_size]
                pixels = np.stack([transform(decode_image(os.fspath(img) if isinstance(img, os.PathLike) else img,
                                                        f"<calibration image {i + j}>"))
                                   for j, img in enumerate(chunk)])
                yield {input_name: pixels.astype(np.float32)}

        super().__init__(batches)


# The ops whose inputs and outputs static int8 quantises. Clip and Relu are listed not to run them
# in int8 but so that onnxruntime takes a convolution's output range from *after* its activation
# and drops the activation (QDQRemovableActivation): quantising a Conv's output before ReLU6 spends
# the 256 levels on negative values and peaks that ReLU6 then discards. On the general student
# (EfficientNet-Lite0, 64 px, 500 Tiny-ImageNet validation images, 200-way zero-shot) that alone
# moved top-1 agreement with fp32 from 70.8 % to 94.8 % (benchmarks/int8_placement.py, docs/edge-bundle.md).
STATIC_OP_TYPES = ("Conv", "MatMul", "Gemm", "Clip", "Relu")


WEIGHTED_OP_TYPES = ("Conv", "MatMul", "Gemm")


def weighted_nodes(graph: onnx.GraphProto) -> list[tuple[list[str], int]]:
    """(node names, weight elements) of every Conv/MatMul/Gemm with a constant weight, in graph order.

    A node whose only reader is a Clip or Relu comes with it: kept fp32 alone, the convolution would
    hand the quantiser its activation's *input*, negative values and all, and that activation's int8
    range would then cover what ReLU6 discards (the placement of :data:`STATIC_OP_TYPES`).
    """
    sizes = {t.name: int(np.prod(t.dims)) for t in graph.initializer}
    readers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    out = []
    for n in graph.node:
        if n.op_type in WEIGHTED_OP_TYPES and len(n.input) > 1 and n.input[1] in sizes:
            after = readers.get(n.output[0], [])
            act = [after[0].name] if len(after) == 1 and after[0].op_type in ("Clip", "Relu") else []
            out.append(([n.name, *act], sizes[n.input[1]]))
    return out


def float_prefix_nodes(graph: onnx.GraphProto, layers: int) -> list[str]:
    """The nodes a mixed int8 graph keeps fp32: the first ``layers`` weighted nodes (:func:`weighted_nodes`, graph
    order) with their activations. One region from the input on, so no float node sits between a DequantizeLinear
    and a QuantizeLinear, which onnxruntime's CPU provider would fuse back into an int8 kernel.

    Raises:
        ValueError: ``layers`` below 0 or above the graph's weighted nodes.
    """
    nodes = weighted_nodes(graph)
    if not 0 <= layers <= len(nodes):
        raise ValueError(f"int8_float_layers={layers}: expected 0 to {len(nodes)} (the graph's Conv/MatMul/Gemm "
                         "nodes with constant weights)")
    return [name for group, _ in nodes[:layers] for name in group]


def quantize_int8_static(
    src: str | Path,
    dst: str | Path,
    calibration: CalibrationDataReader,
    *,
    per_channel: bool = True,
    op_types: Sequence[str] = STATIC_OP_TYPES,
    activation_type: str = "quint8",
    weight_type: str = "qint8",
    method: str = "minmax",
    nodes_to_exclude: Sequence[str] = (),
    reduce_range: bool | None = None,
    ranges: ActivationRanges | None = None,
    float_layers: int = 0,
) -> Path:
    """Calibrated int8 in QDQ format (QuantizeLinear/DequantizeLinear pairs around each op).

    Args:
        calibration: e.g. :class:`ImageCalibrationReader` over a few hundred real images.
        method: ``minmax``, ``entropy`` or ``percentile`` activation-range calibration.
        reduce_range: 7-bit weights, so that x86 CPUs without VNNI (whose u8s8 kernels sum pairs of
            products in int16) do not saturate; at the cost of weight precision (docs/edge-bundle.md).
            None (default): on exactly such a CPU (:func:`exports.cpu_int8.cpu_int8_dot`), as
            onnxruntime recommends there; the file then suits the CPU it was made and checked on.
        ranges: a QAT student's learnt activation ranges (:mod:`exports.qat_ranges`): they replace the
            calibrated range of every tensor they match, so the graph rounds as the student trained.
        float_layers: keep the first this many weighted layers fp32 (:func:`float_prefix_nodes`): a mixed
            graph that rounds less where rounding flips the most decisions, at some of int8's speed and size
            (docs/edge-bundle.md).
    """
    if reduce_range is None:
        reduce_range = saturates(cpu_int8_dot())
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"calibration method {method!r}; expected one of {sorted(methods)}")
    with _quantization_input(src) as pre:
        extra: dict[str, Any] = {"MatMulConstBOnly": True}
        if ranges is not None:
            extra["TensorQuantOverrides"] = ranges.tensor_overrides(pre)
        quantize_static(
            str(pre), str(dst), calibration,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            per_channel=per_channel,
            activation_type=_qtype(activation_type),
            weight_type=_qtype(weight_type),
            calibrate_method=methods[method],
            nodes_to_exclude=[*(float_prefix_nodes(onnx.load(str(pre)).graph, float_layers) if float_layers else ()),
                              *nodes_to_exclude],
            reduce_range=reduce_range,
            extra_options=extra,
        )
    return Path(dst)


def quantize_w8a16(src: str | Path, dst: str | Path, calibration: CalibrationDataReader, **kwargs: Any) -> Path:
    """int8 weights (per channel) with 16-bit activations, QDQ; needs calibration like int8-static.

    16-bit activation ranges keep the outliers of transformer activations (LayerNorm outputs,
    attention scores) that 8-bit static ranges clip and dynamic int8 rounds coarsely. ONNX has
    16-bit QuantizeLinear only from opset 21: onnxruntime's quantiser raises the graph's opset to
    21 itself. onnxruntime's CPU provider has no 16-bit integer kernels and runs the graph as
    dequantise -> float op -> quantise: the gain is the 4x smaller weights and the format NPUs
    (QNN, ...) run natively, not CPU speed.
    """
    kwargs = {"activation_type": "quint16", "weight_type": "qint8", **kwargs}
    return quantize_int8_static(src, dst, calibration, **kwargs)


def make_variant(
    src: str | Path, dst: str | Path, precision: str, calibration: CalibrationDataReader | None = None,
    ranges: ActivationRanges | None = None, float_layers: int = 0, **kwargs: Any
) -> Path:
    """Write ``src`` (an fp32 graph) at ``precision`` (one of :data:`VARIANT_PRECISIONS`) to ``dst``.

    ``int8`` resolves to a concrete scheme first (:func:`exports.int8_scheme.choose_int8_scheme`).
    ``ranges`` (a QAT student's activation ranges) and ``float_layers`` (leading layers kept fp32) apply to
    ``int8-static`` only.
    """
    precision = resolve_precision(precision, src) if precision == AUTO_INT8 else precision
    if precision == "fp32":
        load_onnx_model(src)
        shutil.copyfile(src, dst)
        return Path(dst)
    if precision == "fp16":
        return convert_fp16(src, dst, **kwargs)
    if precision == "int8-dynamic":
        return quantize_int8_dynamic(src, dst, **kwargs)
    if precision in CALIBRATED and calibration is None:
        raise ValueError(f"precision {precision!r} needs calibration data (e.g. an ImageCalibrationReader)")
    if precision == "int8-static":
        return quantize_int8_static(src, dst, calibration, ranges=ranges, float_layers=float_layers, **kwargs)
    if precision == W8A16:
        return quantize_w8a16(src, dst, calibration, **kwargs)
    raise ValueError(f"precision {precision!r}; expected one of {VARIANT_PRECISIONS}")
