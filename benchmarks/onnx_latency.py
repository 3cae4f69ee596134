"""Batch-1 latency of image encoders as a bundle runs them: onnxruntime, graph optimisation "all".

    python benchmarks/onnx_latency.py fp32=outputs/general-qat/export/onnx/image_encoder.fp32.onnx \\
        int8=outputs/general-qat/export/bundle-int8/image_encoder.onnx --threads 1 --iters 2000

Each file is opened as ``exports.runtime.OnnxGraph`` (what ``exports.predict`` uses) and fed one
random image of its input size; ``--warmup`` untimed calls, then ``--iters`` timed calls, the files
interleaved in rounds of 100 so that a busy spell of the machine hits them alike. Prints the median
and p95 per file and each median as a multiple of the first file's. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from exports.interface import IMAGE_ENCODER
from exports.runtime import OnnxGraph


def batch1_latency(files: dict[str, str], threads: int, warmup: int = 50, iters: int = 2000
                   ) -> dict[str, tuple[float, float]]:
    """``{name: (median ms, p95 ms)}`` of one random image through each image encoder in ``files``
    (``{name: path}``), interleaved in rounds of 100 calls."""
    graphs = {name: OnnxGraph(path, IMAGE_ENCODER, threads=threads) for name, path in files.items()}
    shape = [1 if not isinstance(d, int) else d for d in next(iter(graphs.values())).session.get_inputs()[0].shape]
    shape[0] = 1
    feed = {"pixel_values": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    times: dict[str, list[float]] = {name: [] for name in graphs}
    for graph in graphs.values():
        for _ in range(warmup):
            graph(feed)
    for _ in range(max(iters // 100, 1)):
        for name, graph in graphs.items():
            for _ in range(100):
                start = time.perf_counter()
                graph(feed)
                times[name].append(time.perf_counter() - start)
    return {name: (float(np.median(t) * 1e3), float(np.percentile(t, 95) * 1e3)) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", metavar="NAME=PATH")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--iters", type=int, default=2000)
    args = p.parse_args()
    files = dict(item.partition("=")[::2] for item in args.files)
    base = None
    for name, (median, p95) in batch1_latency(files, args.threads, args.warmup, args.iters).items():
        base = base or median
        print(f"| {name} | {args.threads} | {median:.3f} | {p95:.3f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
