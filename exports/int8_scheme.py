"""Which int8 scheme suits a graph: the ``int8`` variant picks one per architecture.

onnxruntime's dynamic quantisation only has integer kernels for MatMul/Gemm, so on a CNN it
leaves every convolution in fp32: the "int8" file is as large and as slow as the fp32 one
(13.7 against 13.7 MB, 0.48 against 0.48 ms for ``resnet-cifar-m``). Static QDQ quantisation
with calibrated activation ranges turns the convolutions into QLinearConv (3.5 MB, 0.25 ms).
Transformers are the other way round: their weights sit in MatMuls, and dynamic quantisation
needs no calibration and keeps per-token activation ranges, which static ranges handle badly.

The choice reads the graph, not a name list, so any student architecture gets one: the op type
that holds most of the weights decides. Imports only onnx (no torch).
"""

from __future__ import annotations

from pathlib import Path

import onnx

AUTO_INT8 = "int8"
CONV_OPS = ("Conv", "ConvTranspose")
MATMUL_OPS = ("MatMul", "Gemm")


def weights_by_op(model: onnx.ModelProto) -> dict[str, int]:
    """Number of constant weight elements consumed per op type (initializers only)."""
    sizes = {init.name: _numel(init) for init in model.graph.initializer}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        n = sum(sizes.get(name, 0) for name in node.input[1:2])  # the weight input of Conv/MatMul/Gemm
        if n:
            counts[node.op_type] = counts.get(node.op_type, 0) + n
    return counts


def _numel(tensor: onnx.TensorProto) -> int:
    n = 1
    for d in tensor.dims:
        n *= int(d)
    return n


def choose_int8_scheme(path: str | Path) -> tuple[str, str]:
    """``("int8-static" | "int8-dynamic", why)`` for the fp32 graph at ``path``."""
    counts = weights_by_op(onnx.load(str(path), load_external_data=False))
    conv = sum(counts.get(op, 0) for op in CONV_OPS)
    matmul = sum(counts.get(op, 0) for op in MATMUL_OPS)
    share = conv / max(conv + matmul, 1)
    if conv > matmul:
        return "int8-static", (f"convolutions hold {share:.0%} of the weights: static QDQ int8 "
                               "(dynamic int8 would leave them fp32)")
    return "int8-dynamic", f"MatMul/Gemm hold {1 - share:.0%} of the weights: dynamic int8"


def resolve_precision(precision: str, fp32_path: str | Path) -> str:
    """``precision`` itself, or for ``int8`` the scheme :func:`choose_int8_scheme` picks."""
    return choose_int8_scheme(fp32_path)[0] if precision == AUTO_INT8 else precision
