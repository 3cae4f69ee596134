"""End-to-end results table: the reference teacher and its distilled students on real data.

    python benchmarks/results.py --teacher outputs/reference-domain/final \\
        --student outputs/default/final --student outputs/student-mobilenet/final ...

For every model (teacher first): image-tower parameters and GFLOPs per image, onnxruntime CPU
latency at batch 1 (fp32 image encoder), zero-shot top-1 on CIFAR-10 test and on Tiny-ImageNet
validation (200-way, WordNet names), COCO-mini retrieval R@5, and, for students trained with
``export.enabled``, the fp16 and int8 variants' top-1 agreement with the teacher from the run's
own parity report (``<run>/export/parity.json``). Evaluation sets are seeded random subsets of
``--limit`` images. Writes ``outputs/results/results.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DATA = Path("../shared/data")


def evaluate(model: str, data: Path, split: str, limit: int | None, **extra: str) -> dict:
    from distill.evaluate import main as evaluate_main

    argv = ["--model", model, "--data", str(data), "--split", split, "--no-progress", "--device", "cpu"]
    if limit:
        argv += ["--limit", str(limit), "--shuffle"]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", value]
    return evaluate_main(argv)


def ort_latency_ms(model, iters: int = 30, threads: int = 2) -> float:
    """p50 latency of the fp32 ONNX image encoder at batch 1 (onnxruntime, CPU)."""
    import onnxruntime as ort

    from exports.onnx_export import export_image_encoder

    h, w = model.image_transform.output_size
    with tempfile.TemporaryDirectory() as tmp:
        path = export_image_encoder(model, Path(tmp) / "image.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, h, w), np.float32)}
        for _ in range(5):
            session.run(None, feed)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def parity_agreement(model_dir: Path) -> dict[str, float | None]:
    """fp16 / int8 top-1 agreement with the torch student and with the teacher, from the training
    run's own parity report (``<run>/export/parity.json``); None where there is none."""
    report = model_dir.parent / "export" / "parity.json"
    subjects = {s["name"]: s for s in json.loads(report.read_text())["subjects"]} if report.is_file() else {}
    out = {}
    for key, name in (("fp16", "fp16"), ("int8", "int8-dynamic")):
        metrics = subjects.get(name, {}).get("metrics", {})
        out[key] = metrics.get("agreement_student")
        out[f"{key}_teacher"] = metrics.get("agreement_teacher")
    return out


def measure(path: str, limit: int | None) -> dict:
    from clipcore.flops import image_gflops, image_parameters
    from students import load_model

    model = load_model(path)
    row = {"model": path, "name": model.name, "params_m": image_parameters(model) / 1e6,
           "gflops": image_gflops(model), "ort_ms_bs1": ort_latency_ms(model)}
    del model
    cifar = evaluate(path, DATA / "cifar10", "test", limit, templates="openai_cifar")
    tiny = evaluate(path, DATA / "tiny-imagenet", "validation", limit, templates="openai_cifar",
                    classnames=str(DATA / "tiny-imagenet" / "words.json"))
    coco = evaluate(path, DATA / "coco-mini", "train", None)
    row.update(cifar10_top1=cifar["zeroshot"]["top1"], tiny_top1=tiny["zeroshot"]["top1"],
               coco_i2t_r5=coco["retrieval"]["image_to_text"]["R@5"],
               coco_t2i_r5=coco["retrieval"]["text_to_image"]["R@5"], **parity_agreement(Path(path)))
    return row


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"


def _agree(row: dict, key: str) -> str:
    if row.get(key) is None:
        return "—"
    return f"{_pct(row[key])} ({_pct(row.get(f'{key}_teacher'))})"


def table(rows: list[dict]) -> str:
    teacher = rows[0]
    lines = ["| model | params (image) | GFLOPs | ORT CPU bs1 | CIFAR-10 zs top-1 | % of teacher | "
             "Tiny-ImageNet top-1 | % of teacher | COCO-mini R@5 (i→t / t→i) | fp16 agreement: student (teacher) "
             "| int8 agreement: student (teacher) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['params_m']:.2f}M | {r['gflops']:.3f} | {r['ort_ms_bs1']:.2f} ms | "
            f"{_pct(r['cifar10_top1'])} | {100 * r['cifar10_top1'] / teacher['cifar10_top1']:.1f} % | "
            f"{_pct(r['tiny_top1'])} | {100 * r['tiny_top1'] / teacher['tiny_top1']:.0f} % | "
            f"{_pct(r['coco_i2t_r5'])} / {_pct(r['coco_t2i_r5'])} | {_agree(r, 'fp16')} | {_agree(r, 'int8')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", action="append", default=[], help="a saved student directory (repeatable)")
    p.add_argument("--limit", type=int, default=2000, help="images per evaluation set (0: all)")
    p.add_argument("--out", default="outputs/results")
    p.add_argument("--render-only", action="store_true",
                   help="re-read the parity reports and re-render OUT/results.json without re-measuring")
    args = p.parse_args(argv)
    if args.render_only:
        rows = json.loads((Path(args.out) / "results.json").read_text())
        for row in rows[1:]:
            row.update(parity_agreement(Path(row["model"])))
        return _write(rows, Path(args.out))
    if not DATA.is_dir():
        print(f"error: {DATA} is absent: the results need CIFAR-10, Tiny-ImageNet and COCO-mini", file=sys.stderr)
        return 2
    rows = []
    for label, path in [("teacher", args.teacher)] + [(f"student {i + 1}", s) for i, s in enumerate(args.student)]:
        row = measure(path, args.limit or None)
        row["label"] = f"{label}: `{row['name']}`"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return _write(rows, Path(args.out))


def _write(rows: list[dict], out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows)
    (out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
