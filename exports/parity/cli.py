"""Parity report: does every exported variant of a student still classify like the student?

    python -m exports.parity --teacher T --student S --data ../shared/data/cifar10 --split test --limit 1000

Exit status: 0 every gate passed, 1 a gate failed or a variant could not run, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from clipcore.data import DatasetUnavailableError, DataSpec, DataSpecError
from clipcore.dual_encoder import DualEncoder, ModelNotFoundError
from clipcore.loading import load_teacher
from clipcore.paths import output_path_problem
from exports.parity.gates import DEFAULT_GATES, GATE_FIELDS, ParityInputError, load_gates
from exports.parity.results import ParitySettings, summary_table
from exports.parity.run import run_parity
from exports.parity.subjects import error_text
from exports.parity.names import DEFAULT_VARIANTS
from exports.parity.variants import check_variant_names
from exports.runtime import InvalidModelError
from students import load_model


# a Hugging Face CLIP directory, or a reference dual encoder built by the trainer (clipcore.towers)
TEACHER_MARKERS = ("config.json", "dual_encoder.json")


def cli_model(flag: str, path: str, loader: Callable[[], DualEncoder],
               markers: Sequence[str] = ("config.json",)) -> DualEncoder:
    """Run ``loader``; a model that loads but cannot serve as a dual encoder is bad input.

    A local path is checked first: a file, or a directory holding none of ``markers``, is
    refused in one line (transformers' own message for it lists every architecture it knows).

    transformers and the student loader report an unsupported architecture (a BERT directory,
    an unknown ``student.json`` kind, a teacher of another embedding size) as TypeError or
    ValueError; the CLI turns those into exit 2 with the flag and path, not a traceback.

    Raises:
        ModelNotFoundError: unchanged (its message already names the path).
        ParityInputError: any other loading error.
    """
    local = Path(path)
    if local.is_file() or (local.is_dir() and not any((local / m).is_file() for m in markers)):
        what = "is a file" if local.is_file() else f"has no {' or '.join(markers)}"
        raise ParityInputError(f"{flag} {path}: not a model directory ({what})")
    try:
        return loader()
    except ModelNotFoundError:
        raise
    except (TypeError, ValueError, KeyError, OSError) as exc:
        raise ParityInputError(f"{flag} {path}: not a usable CLIP-family model ({error_text(exc)})") from exc


def _onnx_arg(item: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{item!r}: expected NAME=PATH")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exports.parity", description=__doc__.split("\n\n")[0],
                                epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher: hub id or model directory")
    p.add_argument("--teacher-random-init", action="store_true", help="build the teacher from its config (random weights)")
    p.add_argument("--student", required=True, help="student directory (save_student) or a Hugging Face CLIP model")
    p.add_argument("--data", required=True, help="labelled dataset: parquet/imagefolder directory or hub id")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N images")
    p.add_argument("--shuffle", action="store_true", help="with --limit: a seeded random subset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--classnames", default=None, help="JSON file or comma-separated names (default: ClassLabel names)")
    p.add_argument("--templates", default="openai_cifar", help="template set name or a '{}' template")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated subset of {','.join(DEFAULT_VARIANTS)} (default: all)")
    p.add_argument("--onnx", type=_onnx_arg, action="append", default=[], metavar="NAME=PATH",
                   help="also measure this image encoder (gated by the precision its name mentions, else fp32)")
    p.add_argument("--gates", default=None, help="YAML/JSON file: {fp32|fp16|int8|VARIANT: {field: value}}")
    p.add_argument("--gate", action="append", default=[], metavar="KEY.FIELD=VALUE",
                   help=f"override one threshold, e.g. int8.min_agreement=0.98; fields: {', '.join(GATE_FIELDS)}")
    p.add_argument("--calibration-split", default="train", help="int8-static calibration images (default: train)")
    p.add_argument("--calibration-limit", type=int, default=128)
    p.add_argument("--calibration-data", default=None, help="calibration dataset (default: --data)")
    p.add_argument("--int8-float-layers", type=int, default=0, metavar="N",
                   help="int8-static: keep the first N weighted layers fp32, a mixed graph (default 0: all int8)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before the batch-1 latency runs")
    p.add_argument("--iters", type=int, default=20, help="timed batch-1 runs (p50/p95 over these)")
    p.add_argument("--throughput-batch", type=int, default=32)
    p.add_argument("--throughput-iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime intra-op threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch models' device")
    p.add_argument("--out", default="outputs/parity", help="writes parity.{json,md,html} and onnx/ here")
    p.add_argument("--keep-rejected", action="store_true", help="keep the ONNX files of rejected variants")
    p.add_argument("--max-flips", type=int, default=12,
                   help="per variant, at most N images whose top-1 changed, with thumbnails (default 12)")
    p.add_argument("--text-encoder", action="store_true",
                   help="also gate the text encoder (fp32, int8) and device tokenizer of open-vocabulary bundles")
    return p


def _epilog() -> str:
    gates = "\n".join(f"  {key:5} " + ", ".join(f"{k}={v:g}" for k, v in gate.to_dict().items())
                      for key, gate in DEFAULT_GATES.items())
    return (f"default gates (fractions; against the torch student):\n{gates}\n"
            "exit status: 0 every gate passed, 1 a gate failed or a variant could not run, 2 bad input\n"
            "GPU variants that cannot run here are reported as 'skipped: <reason>' and do not fail the run.")


def settings_from_args(args: argparse.Namespace) -> ParitySettings:
    return ParitySettings(
        templates=args.templates, classnames=args.classnames, batch_size=args.batch_size, warmup=args.warmup,
        iters=args.iters, throughput_batch=args.throughput_batch, throughput_iters=args.throughput_iters,
        threads=args.threads, calibration_split=args.calibration_split, calibration_limit=args.calibration_limit,
        calibration_data=args.calibration_data, calibration_seed=args.seed, int8_float_layers=args.int8_float_layers,
        text_encoder=args.text_encoder,
        max_flips=args.max_flips, keep_rejected=args.keep_rejected,
    )


# ParityInputError, DataSpecError and InvalidModelError are ValueErrors, but a bare ValueError
# from deep inside a run is a bug and keeps its traceback
BAD_INPUT = (ParityInputError, DataSpecError, DatasetUnavailableError, InvalidModelError, ModelNotFoundError,
             FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 passed, 1 a gate failed, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        # everything cheap is validated before the models load
        problem = output_path_problem(args.out, "dir")
        if problem:
            raise ParityInputError(f"--out {args.out}: {problem}")
        gates = load_gates(args.gates, args.gate, names=[name for name, _ in args.onnx])
        try:
            variants = check_variant_names([v.strip() for v in args.variants.split(",") if v.strip()])
        except ParityInputError as exc:
            raise ParityInputError(f"--variants {args.variants!r}: {exc}") from None
        settings = settings_from_args(args)
        spec = DataSpec(path=args.data, split=args.split, image_column=args.image_column,
                        label_column=args.label_column, limit=args.limit,
                        shuffle_seed=args.seed if args.shuffle else None)
        teacher = cli_model("--teacher", args.teacher, lambda: load_teacher(
            args.teacher, random_init=args.teacher_random_init, device=args.device), markers=TEACHER_MARKERS)
        student = cli_model("--student", args.student, lambda: load_model(args.student, teacher=teacher, device=args.device),
                             markers=("student.json", "config.json"))
        report = run_parity(teacher, student, spec, args.out, variants=variants, gates=gates,
                            settings=settings, onnx_files=dict(args.onnx))
    except BAD_INPUT as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = report.write(args.out)
    print(summary_table(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    for message in report.failures():
        print(f"gate failed: {message}", file=sys.stderr)
    return 0 if report.passed else 1
