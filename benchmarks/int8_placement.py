"""Where static int8 rounds, and what it costs: top-1 agreement of int8 image encoders with fp32.

    python benchmarks/int8_placement.py --student outputs/general/final
    python benchmarks/int8_placement.py --student outputs/general-qat/final --rows default,qat-ranges

Exports the student's image encoder, quantises it statically (QDQ, calibrated on 128 seeded
Tiny-ImageNet training images) under several settings, and compares each with the fp32 graph on
500 seeded Tiny-ImageNet validation images: top-1 agreement of 200-way zero-shot (one prompt per
WordNet name, the student's own text side) and the cosine of the image embeddings. Rows:

    conv-matmul   quantise Conv/MatMul/Gemm only (the setting before 2026-12-02)
    default       exports.precision.STATIC_OP_TYPES (+ Clip, Relu: ranges after the activation)
    stem-fp32     default, the first convolution kept fp32
    head-fp32     default, the MatMul head kept fp32
    entropy       default, entropy calibration
    percentile    default, percentile calibration
    rounded       default, on the student with its weights first rounded to their int8 grids
    float-kernels default, run with onnxruntime's graph optimisations off: the same QDQ file computed
                  as dequantise -> float op -> quantise, i.e. without the int8 kernels of this CPU
    reduce-range  default with 7-bit weights (onnxruntime's remedy for x86 CPUs without VNNI, and what
                  quantize_int8_static does by itself on such a CPU; every other row has 8-bit weights)
    u8u8          default with uint8 weights (no saturating u8s8 kernel; slow on CPUs without VNNI)
    qat-ranges    default with the activation ranges a QAT student trained under (its qat_ranges.json,
                  exports.qat_ranges) instead of calibrated ones: what the export does for such a student
    torch-sim     no ONNX: the torch student fake-quantised as QAT trains it (students.qat, ranges set once from
                  the same 128 calibration images), against the torch fp32 student; "sim vs ORT" prints its
                  cosine to the float-kernels QDQ graph, i.e. how faithfully QAT simulates the export

The CPU's int8 dot-product instructions are printed first (exports.cpu_int8.cpu_int8_dot):
on x86 without VNNI, onnxruntime's u8s8 kernels sum pairs of products in int16 and saturate, so
the default row can fall far below float-kernels there (docs/edge-bundle.md).

Needs ``../shared/data/tiny-imagenet``. Writes nothing but the temporary ONNX files (``--keep DIR``
copies them there, e.g. for ``benchmarks/onnx_latency.py``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from clipcore.data import DataSpec, load_hf_dataset, resolve_columns
from clipcore.imaging import decode_image
from exports.interface import IMAGE_ENCODER
from exports.cpu_int8 import cpu_int8_dot
from exports.onnx_export import export_image_encoder
from exports.precision import ImageCalibrationReader, quantize_int8_static
from exports.qat_ranges import activation_ranges
from exports.runtime import OnnxGraph
from students import load_model
from students.qat import FakeQuantWeight, prepare_qat

TINY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiny-imagenet"
ROWS = ("conv-matmul", "default", "stem-fp32", "head-fp32", "entropy", "percentile", "rounded", "float-kernels",
        "reduce-range", "u8u8", "qat-ranges", "torch-sim")


def images(split: str, n: int, seed: int) -> list:
    ds = load_hf_dataset(DataSpec(path=str(TINY), split=split, limit=n, shuffle_seed=seed))
    column = resolve_columns(ds).image
    return [row[column] for row in ds]


def tiny_names() -> list[str]:
    """Tiny-ImageNet's 200 WordNet names (each entry's first), for the 200-way zero-shot head."""
    names = json.loads((TINY / "words.json").read_text())
    return [n if isinstance(n, str) else n[0] for n in (names.values() if isinstance(names, dict) else names)]


def row_settings(name: str, fp32: Path) -> dict:
    graph = onnx.load(str(fp32))
    ops = {n.op_type: n.name for n in reversed(graph.graph.node)}
    first_conv = next(n.name for n in graph.graph.node if n.op_type == "Conv")
    return {"conv-matmul": {"op_types": ("Conv", "MatMul", "Gemm")}, "default": {}, "rounded": {},
            "stem-fp32": {"nodes_to_exclude": [first_conv]},
            "head-fp32": {"nodes_to_exclude": [ops.get("MatMul") or ops.get("Gemm")]},
            "entropy": {"method": "entropy"}, "percentile": {"method": "percentile"}, "float-kernels": {},
            "reduce-range": {"reduce_range": True}, "u8u8": {"weight_type": "quint8"}, "qat-ranges": {}, "torch-sim": {}}[name]


def round_weights(student) -> None:
    with torch.no_grad():
        for module in student.image_tower.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.copy_(FakeQuantWeight()(module.weight))


def torch_sim(student, cal_pixels: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Image embeddings of ``student`` fake-quantised as QAT trains it, ranges from ``cal_pixels`` (in place)."""
    student.eval()
    tower, cal = student.image_tower, torch.from_numpy(cal_pixels)
    prepare_qat(tower, lambda: tower(cal), momentum=1.0)  # the last run sets each range to the batch's min/max
    with torch.no_grad():
        out = torch.cat([student.image_features(torch.from_numpy(pixels[i:i + 64])) for i in range(0, len(pixels), 64)])
    out = out.float().numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def embed(path: Path, pixels: np.ndarray, optimization: str = "all") -> np.ndarray:
    graph = OnnxGraph(path, IMAGE_ENCODER, threads=2, optimization=optimization)
    out = np.concatenate([graph({"pixel_values": pixels[i:i + 64]})[IMAGE_ENCODER.outputs[0].name]
                          for i in range(0, len(pixels), 64)])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--keep", default=None, help="also copy each row's int8 file (and fp32.onnx) into this directory")
    args = p.parse_args()
    torch.set_num_threads(2)
    names = tiny_names()
    print(f"CPU int8 dot product: {cpu_int8_dot()}", flush=True)
    cal, val = images("train", 128, 0), images("validation", args.limit, 1)
    results = {}
    for name in args.rows.split(","):
        student = load_model(args.student)
        if name == "rounded":
            round_weights(student)
        transform = student.image_transform
        pixels = np.stack([transform(decode_image(im, "validation image")) for im in val]).astype(np.float32)
        with torch.no_grad():
            head = student.encode_text([f"a photo of a {n.split(',')[0]}." for n in names]).float().numpy()
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_image_encoder(student, Path(tmp) / "fp32.onnx")
            ref = embed(fp32, pixels)
            if name == "torch-sim":
                cal_pixels = np.stack([transform(decode_image(im, "calibration image")) for im in cal]).astype(np.float32)
                ort = embed(quantize_int8_static(fp32, Path(tmp) / "int8.onnx", ImageCalibrationReader(cal, transform),
                                                 reduce_range=False), pixels, "disable")
                emb = torch_sim(student, cal_pixels, pixels)
                print(f"sim vs ORT float kernels: cosine mean {(emb * ort).sum(1).mean():.4f}, min {(emb * ort).sum(1).min():.4f}, "
                      f"top-1 agreement {((emb @ head.T).argmax(1) == (ort @ head.T).argmax(1)).mean():.1%}", flush=True)
            else:
                ranges = activation_ranges(student, IMAGE_ENCODER.inputs[0].name) if name == "qat-ranges" else None
                if name == "qat-ranges" and ranges is None:
                    raise SystemExit(f"row qat-ranges: {args.student} is not a QAT student (no qat_ranges.json)")
                int8 = quantize_int8_static(fp32, Path(tmp) / "int8.onnx", ImageCalibrationReader(cal, transform),
                                            ranges=ranges, **{"reduce_range": False, **row_settings(name, fp32)})
                emb = embed(int8, pixels, "disable" if name == "float-kernels" else "all")
            if args.keep and name != "torch-sim":
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(fp32, Path(args.keep) / "fp32.onnx")
                shutil.copyfile(int8, Path(args.keep) / f"{name}.onnx")
        agree = float(((emb @ head.T).argmax(1) == (ref @ head.T).argmax(1)).mean())
        cos = (emb * ref).sum(1)
        results[name] = {"agreement": agree, "cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
        print(f"| {name} | {agree:.1%} | {cos.mean():.4f} / {cos.min():.4f} |", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
