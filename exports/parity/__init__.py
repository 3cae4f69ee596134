"""Parity report: does every exported variant of a student still classify like the student?

    python -m exports.parity --teacher T --student S --data ../shared/data/cifar10 --split test --limit 1000

Subjects are the teacher (torch), the student (torch), the student's ONNX image encoder at every
precision of :data:`exports.precision.PRECISIONS` (onnxruntime, CPU), the GPU variants of
:mod:`exports.providers` where they can run, and any ONNX files given with ``--onnx NAME=PATH``.
Each runs the full zero-shot pipeline on a labelled evaluation set: class-name prompts -> class
embeddings -> image embeddings -> ``softmax(logit_scale * img @ classes.T)``.

Class embeddings: the teacher's for the teacher; the torch student's for the student; for the
exported variants those of the student's exported fp32 text encoder (onnxruntime), computed once,
or, for image-only students whose text side is the frozen teacher's, the teacher's.

Every variant is held to a :class:`Gate` (by its name, else by its precision family ``fp32``,
``fp16`` or ``int8``); it is ``kept`` when it passes and ``rejected`` (its file deleted unless
``keep_rejected``) when it does not. The CLI writes ``parity.json``, ``parity.md`` and a
self-contained ``parity.html`` and exits 1 when a gate fails, 2 on bad input.

One module per job:

* ``gates``      thresholds, their defaults and their parsing (``--gates FILE``, ``--gate K.F=V``)
* ``results``    the report model: settings, one result per subject, the report and its files
* ``subjects``   the models under test: pixels -> image embeddings
* ``eval_data``  the labelled evaluation set, calibration images and every subject's class head
* ``variants``   the exported image encoder at each precision / runtime, or why it cannot run
* ``measure``    embeddings, zero-shot metrics, latency, the environment
* ``run``        :func:`run_parity`, the orchestration
* ``cli``        ``python -m exports.parity`` and its model loading
"""

from exports.parity.cli import main
from exports.parity.gates import (
    DEFAULT_GATES,
    GATE_FIELDS,
    Gate,
    GateCheck,
    ParityInputError,
    load_gates,
    precision_from_name,
    resolve_gate,
)
from exports.parity.measure import mean_kl
from exports.parity.results import ParityReport, ParitySettings, SubjectResult, summary_table
from exports.parity.run import run_parity
from exports.parity.names import DEFAULT_VARIANTS
from exports.parity.variants import check_variant_names

__all__ = [
    "DEFAULT_GATES",
    "DEFAULT_VARIANTS",
    "GATE_FIELDS",
    "Gate",
    "GateCheck",
    "ParityInputError",
    "ParityReport",
    "ParitySettings",
    "SubjectResult",
    "check_variant_names",
    "load_gates",
    "main",
    "mean_kl",
    "precision_from_name",
    "resolve_gate",
    "run_parity",
    "summary_table",
]
