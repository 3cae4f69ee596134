"""int8 token-embedding tables (exports.precision.quantize_embedding_tables)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exports.precision import quantize_embedding_tables, quantize_int8_dynamic
from exports.runtime import load_session


def _embedding_graph(tmp_path, vocab=2000, dim=64, small=(16, 64), direct=False):
    """ids -> token table lookup + position table lookup -> MatMul: a text encoder's first steps."""
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((vocab, dim)) * rng.uniform(0.01, 2.0, (vocab, 1))).astype(np.float32)
    positions = rng.standard_normal(small).astype(np.float32)
    proj = rng.standard_normal((dim, 8)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["tok"], axis=0, name="embed"),
             helper.make_node("Gather", ["positions", "pos_ids"], ["pos"], axis=0, name="embed_pos"),
             helper.make_node("Add", ["tok", "pos"], ["h"]),
             helper.make_node("MatMul", ["h", "proj"], ["out"])]
    if direct:  # the looked-up rows go straight into the MatMul (the position rows are added after it)
        nodes[2:] = [helper.make_node("MatMul", ["tok", "proj"], ["t8"]),
                     helper.make_node("MatMul", ["pos", "proj"], ["pos8"]),
                     helper.make_node("Add", ["t8", "pos8"], ["out"])]
    graph = helper.make_graph(
        nodes, "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "t"]),
         helper.make_tensor_value_info("pos_ids", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "t", 8])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(positions, "positions"),
         numpy_helper.from_array(proj, "proj")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "fp32.onnx"
    onnx.save(model, str(path))
    return path, table


def test_token_table_becomes_int8_per_row_and_stays_close(tmp_path):
    path, table = _embedding_graph(tmp_path)
    model = onnx.load(str(path))
    assert quantize_embedding_tables(model) == ["table"]  # the 16 x 64 position table stays fp32
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: t for t in model.graph.initializer}
    assert "table" not in inits and inits["table_int8"].data_type == TensorProto.INT8
    assert "positions" in inits
    out = tmp_path / "q.onnx"
    onnx.save(model, str(out))
    ids = np.array([[0, 5, 1999, 7]], dtype=np.int64)
    feeds = {"ids": ids, "pos_ids": np.array([[0, 1, 2, 3]], dtype=np.int64)}
    want = load_session(path).run(None, feeds)[0]
    got = load_session(out).run(None, feeds)[0]
    # per-row scales: a looked-up row is off by at most half a step of *its own* scale, so rows of
    # very different sizes (0.01 to 2 here) all keep their precision
    model_q = onnx.load(str(out))
    q = {t.name: numpy_helper.to_array(t) for t in model_q.graph.initializer}
    rows = q["table_int8"].astype(np.float32) * q["table_row_scale"]
    assert (np.abs(rows - table) <= q["table_row_scale"] / 2 + 1e-7).all()
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() > 0.999
    assert out.stat().st_size < 0.4 * path.stat().st_size


def test_int8_dynamic_quantises_the_table_and_can_leave_it(tmp_path):
    """Here the looked-up rows feed a quantised MatMul directly, as a factorised table's do: the
    dynamic quantiser's own "<tensor>_scale" names must not collide with the table's."""
    path, _ = _embedding_graph(tmp_path, direct=True)
    with_tables = quantize_int8_dynamic(path, tmp_path / "a.onnx")
    without = quantize_int8_dynamic(path, tmp_path / "b.onnx", embedding_tables=False)
    names = lambda p: {t.name for t in onnx.load(str(p)).graph.initializer}  # noqa: E731
    assert "table_int8" in names(with_tables) and "table" not in names(with_tables)
    assert "table" in names(without)
    assert with_tables.stat().st_size < 0.4 * without.stat().st_size


def test_int8_dynamic_scales_weights_per_column_by_default(tmp_path):
    """One scale per matrix lets a few large columns set the step of all; per column each keeps its own
    (the text student's int8 head: 97.0 % agreement with fp32 per matrix, 99.1 % per column)."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((64, 32)) * np.r_[np.full(31, 0.02), [4.0]]).astype(np.float32)  # one big column
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])],
        [numpy_helper.from_array(weight, "w")])
    path = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.standard_normal((16, 64)).astype(np.float32)
    want = x @ weight
    errors = {}
    for name, kwargs in (("column", {}), ("matrix", {"per_channel": False})):
        out = quantize_int8_dynamic(path, tmp_path / f"{name}.onnx", **kwargs)
        scales = [numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer if t.name.endswith("_scale")]
        assert max(s.size for s in scales) == (32 if name == "column" else 1)
        got = load_session(out).run(None, {"x": x})[0]
        errors[name] = np.abs(got - want)[:, :31].max()  # the small columns
    assert errors["column"] < errors["matrix"] / 10
