"""benchmarks/int8_sensitivity.py --first: the rows that keep a prefix of the weighted nodes fp32."""

from __future__ import annotations

import argparse
from pathlib import Path

from tests.scripts import load_script


def _script():
    return load_script("benchmarks/int8_sensitivity.py")


def test_prefix_rows_exclude_the_first_nodes_with_their_activations(capsys):
    nodes = [(["stem", "stem_clip"], 10), (["dw"], 20), (["proj", "proj_relu"], 30), (["head"], 40)]
    excluded = []

    def int8(exclude, name):
        excluded.append((name, list(exclude)))
        return Path(name), 1.0 - 0.01 * (4 - len(exclude)), 0.999

    args = argparse.Namespace(latency=False, optimization="all", iters=1, threads=1)
    _script().prefix_rows(nodes, [1, 3], int8, Path("fp32.onnx"), args, None, None, None)
    assert excluded == [("first0.onnx", []), ("first1.onnx", ["stem", "stem_clip"]),
                        ("first3.onnx", ["stem", "stem_clip", "dw", "proj", "proj_relu"])]
    out = capsys.readouterr().out
    assert "| 1 (last: stem) | 10.0% |" in out and "| 3 (last: proj) | 60.0% |" in out
