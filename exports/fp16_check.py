"""Does an fp16 graph keep its numerically sensitive ops in fp32?

onnxruntime's fp16 converter leaves the ops of its block list in fp32 (inputs cast up, outputs
cast down); :data:`exports.precision.FP16_OP_BLOCK_LIST` adds LayerNormalization, Softmax, the
reductions, Pow/Sqrt/Exp/Log and ArgMax to its default list. Transformers depend on exactly
these: a LayerNorm's variance or a softmax's sum in fp16 overflows or loses the small terms.
:func:`fp32_islands` reads a converted graph and says, per sensitive op type, how many of its
nodes compute in fp32, so the parity report can show that the block list took effect (and a
hand-converted ``--onnx`` fp16 file that runs LayerNorm in fp16 stands out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

SENSITIVE_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "Softmax", "ReduceMean", "ReduceSum",
                 "ReduceL2", "Pow", "Sqrt", "Exp", "Log")


def fp32_islands(path: str | Path) -> dict[str, Any]:
    """``{"ops": {op: {"nodes": n, "fp32": k}}, "all_fp32": bool}`` over the sensitive ops present."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    ops: dict[str, dict[str, int]] = {}
    for node in graph.node:
        if node.op_type not in SENSITIVE_OPS or not node.input:
            continue
        entry = ops.setdefault(node.op_type, {"nodes": 0, "fp32": 0})
        entry["nodes"] += 1
        entry["fp32"] += int(types.get(node.input[0]) == TensorProto.FLOAT)
    return {"ops": ops, "all_fp32": all(e["fp32"] == e["nodes"] for e in ops.values())}


def describe(check: dict[str, Any]) -> str:
    """``fp16 graph: LayerNormalization 13/13 in fp32, Softmax 6/6 in fp32`` (one line for the report)."""
    if not check["ops"]:
        return "fp16 graph: no LayerNorm, softmax or reduction ops"
    parts = ", ".join(f"{op} {e['fp32']}/{e['nodes']}" for op, e in sorted(check["ops"].items()))
    verdict = "all kept in fp32" if check["all_fp32"] else "SOME RUN IN FP16"
    return f"fp16 numerics: {verdict} ({parts} nodes in fp32)"
