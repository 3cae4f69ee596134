"""Which layers cost static int8 its agreement, and what keeping them in fp32 buys back.

    python benchmarks/int8_sensitivity.py --student outputs/general/final
    python benchmarks/int8_sensitivity.py --student outputs/general/final --keep 1,2,4,8,16 --latency

Exports the student's image encoder, quantises it statically as the export does (QDQ, calibrated on
128 seeded Tiny-ImageNet training images, ``exports.precision.STATIC_OP_TYPES``) and measures, on
500 seeded Tiny-ImageNet validation images, 200-way zero-shot top-1 agreement with the fp32 graph
(one prompt per WordNet name, the student's own text side) and the embeddings' cosine:

1. leave one out: for every Conv/MatMul/Gemm node, the int8 graph with that node alone kept fp32
   (``nodes_to_exclude``); nodes ranked by how much of the embedding error (1 - mean cosine) that
   removes;
2. cumulative: the ``--keep`` most sensitive nodes kept fp32 together, with their share of the
   weights and (``--latency``) the batch-1 latency against fp32 and full int8.

``--first 13,25`` replaces both with rows that keep the first N weighted nodes in graph order fp32 (the stem and the
early blocks, with their activations: one float region, so no node in it sits between a DequantizeLinear and a
QuantizeLinear for onnxruntime to fuse back into an int8 kernel) and quantise the rest: the mixed graph that
``int8_bits.py --halves`` simulates.

A QAT student (one with ``qat_ranges.json``) is quantised with its own ranges, as the export does.
Needs ``../shared/data/tiny-imagenet``; writes only temporary ONNX files.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: benchmarks/ is not a package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.int8_placement import embed, images, tiny_names  # noqa: E402
from benchmarks.onnx_latency import batch1_latency  # noqa: E402
from clipcore.imaging import decode_image  # noqa: E402
from exports.interface import IMAGE_ENCODER  # noqa: E402
from exports.onnx_export import export_image_encoder  # noqa: E402
from exports.precision import ImageCalibrationReader, quantize_int8_static, weighted_nodes  # noqa: E402
from exports.qat_ranges import activation_ranges  # noqa: E402
from students import load_model  # noqa: E402

def latency_ms(path: Path, iters: int, threads: int = 2) -> float:
    """Median batch-1 milliseconds (benchmarks/onnx_latency.py's timing)."""
    return batch1_latency({"x": str(path)}, threads=threads, warmup=20, iters=iters)["x"][0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True)
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--keep", default="1,2,4,8,16", help="cumulative rows: this many most sensitive nodes kept fp32")
    p.add_argument("--first", help="instead: rows keeping the first N weighted nodes (graph order) fp32, e.g. 13,25")
    p.add_argument("--latency", action="store_true", help="also time each cumulative row at batch 1")
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads of the latency rows")
    p.add_argument("--optimization", default="all", choices=("all", "disable"),
                   help="onnxruntime graph optimisations when measuring agreement: 'disable' computes the QDQ "
                        "graph as written (dequantise -> float op -> quantise), i.e. what excluding a node means "
                        "on paper; 'all' is what the CPU runs (it fuses an excluded node between DQ and Q into "
                        "an int8 kernel again)")
    args = p.parse_args()
    torch.set_num_threads(2)
    names = tiny_names()
    student = load_model(args.student)
    transform = student.image_transform
    cal, val = images("train", 128, 0), images("validation", args.limit, 1)
    pixels = np.stack([transform(decode_image(im, "validation image")) for im in val]).astype(np.float32)
    with torch.no_grad():
        head = student.encode_text([f"a photo of a {n.split(',')[0]}." for n in names]).float().numpy()
    ranges = activation_ranges(student, IMAGE_ENCODER.inputs[0].name)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_image_encoder(student, Path(tmp) / "fp32.onnx")
        ref = embed(fp32, pixels)
        top1 = (ref @ head.T).argmax(1)

        def int8(exclude: list[str], name: str = "int8.onnx", optimization: str = args.optimization
                 ) -> tuple[Path, float, float]:
            out = quantize_int8_static(fp32, Path(tmp) / name, ImageCalibrationReader(cal, transform),
                                       nodes_to_exclude=exclude, ranges=ranges)
            emb = embed(out, pixels, optimization)
            return out, float(((emb @ head.T).argmax(1) == top1).mean()), float((emb * ref).sum(1).mean())

        nodes = weighted_nodes(onnx.load(str(fp32)).graph)
        total = sum(size for _, size in nodes)
        if args.first:
            prefix_rows(nodes, [int(k) for k in args.first.split(",")], int8, fp32, args, pixels, head, top1)
            return
        _, base_agree, base_cos = int8([])
        print(f"{len(nodes)} weighted nodes; all int8: agreement {base_agree:.1%}, cosine {base_cos:.5f}", flush=True)
        gains, groups, share = {}, {}, {}
        for group, size in nodes:
            name = group[0]
            _, agree, cos = int8(group)
            gains[name], groups[name], share[name] = cos - base_cos, group, size
            print(f"  {' + '.join(group)}: {size} weights, agreement {agree:.1%}, cosine {cos:.5f}", flush=True)
        ranked = sorted(gains, key=gains.get, reverse=True)
        print(f"\nranked and measured with optimization={args.optimization}; agreement as onnxruntime runs it "
              "(all) beside it")
        print("\n| kept fp32 | weights fp32 | agreement | agreement (all) | mean cosine | batch-1 ms |\n"
              "|---|---|---|---|---|---|")
        rows = [(0, "all int8")] + [(int(k), None) for k in args.keep.split(",")]
        fp32_ms = latency_ms(fp32, args.iters, args.threads) if args.latency else None
        for k, label in rows:
            kept = ranked[:k]
            exclude = [n for name in kept for n in groups[name]]
            path, agree, cos = int8(exclude, f"keep{k}.onnx")
            # the same graph as onnxruntime runs it (already measured when --optimization is all)
            agree_all = agree if args.optimization == "all" else float(
                ((embed(path, pixels) @ head.T).argmax(1) == top1).mean())
            ms = f"{latency_ms(path, args.iters, args.threads):.3f}" if args.latency else "-"
            weights = sum(share[n] for n in kept) / total
            print(f"| {label or ', '.join(kept) if k <= 2 else f'{k} most sensitive'} | {weights:.1%} | {agree:.1%} "
                  f"| {agree_all:.1%} | {cos:.5f} | {ms} |", flush=True)
        if fp32_ms is not None:
            print(f"| fp32 graph | 100 % | 100 % | 100 % | 1 | {fp32_ms:.3f} |")
        print(json.dumps({"ranked": ranked[:32], "gains": {n: gains[n] for n in ranked[:32]}}))


def prefix_rows(nodes, counts: list[int], int8, fp32: Path, args, pixels, head, top1) -> None:
    """The rows of ``--first``: the first N weighted nodes (and their activations) fp32, the rest int8."""
    total = sum(size for _, size in nodes)
    fp32_ms = latency_ms(fp32, args.iters, args.threads) if args.latency else None
    print(f"{len(nodes)} weighted nodes\n\n| first nodes kept fp32 | weights fp32 | agreement | agreement (all) "
          "| mean cosine | batch-1 ms | x fp32 |\n|---|---|---|---|---|---|---|")
    for k in [0, *counts]:
        exclude = [name for group, _ in nodes[:k] for name in group]
        path, agree, cos = int8(exclude, f"first{k}.onnx")
        agree_all = agree if args.optimization == "all" else float(
            ((embed(path, pixels) @ head.T).argmax(1) == top1).mean())
        ms = latency_ms(path, args.iters, args.threads) if args.latency else None
        timing = f"{ms:.3f} | {ms / fp32_ms:.2f}" if ms is not None else "- | -"
        print(f"| {k} (last: {nodes[k - 1][0][0] if k else '-'}) | {sum(s for _, s in nodes[:k]) / total:.1%} "
              f"| {agree:.1%} | {agree_all:.1%} | {cos:.5f} | {timing} |", flush=True)
    if fp32_ms is not None:
        print(f"| fp32 graph | 100 % | 100 % | 100 % | 1 | {fp32_ms:.3f} | 1 |")


if __name__ == "__main__":
    main()
