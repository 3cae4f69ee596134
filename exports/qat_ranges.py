"""The activation ranges a QAT fine-tune learnt, carried into the static int8 export.

Static int8 export calibrates every activation range afresh (min/max over a few hundred images).
A QAT student was trained under *its own* ranges (moving averages of training batches'
min/max, :mod:`students.qat`), so recalibrating rounds it differently from how it learnt to be
rounded. This module finds, for each saved range, the tensor of the fp32 ONNX graph that carries
that activation, and hands the ranges to onnxruntime's quantiser (``TensorQuantOverrides``).

The torch module names of a range (``in:blocks.3.conv`` ...) do not appear in the ONNX graph, so
tensors are matched by value: the tower runs on a seeded probe batch with hooks at every range's
site, the fp32 graph runs on the same batch with every intermediate tensor exposed
(``onnxruntime.quantization.qdq_loss_debug``), and a site's range goes to every tensor of the
graph whose values are the site's (same size, equal within float error). Sites that match nothing
keep the calibrated range (reported by :meth:`ActivationRanges.tensor_overrides`).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

log = logging.getLogger(__name__)

MATCH_RTOL = 1e-3  # ORT and torch fp32 agree to ~1e-5 of a tensor's scale; distinct tensors differ by far more


@dataclass
class ActivationRanges:
    """Saved ranges with the values of their sites on a probe batch (what matching needs).

    Attributes:
        probe: the graph's inputs for the probe batch (``{input name: array}``).
        sites: ``{site key: (values on the probe, low, high)}``.
        matched: after :meth:`tensor_overrides`, ``{site key: [tensor names]}``.
    """

    probe: dict[str, np.ndarray]
    sites: dict[str, tuple[np.ndarray, float, float]]
    matched: dict[str, list[str]] = field(default_factory=dict)

    def tensor_overrides(self, onnx_path: str | Path) -> dict[str, list[dict[str, np.float32]]]:
        """``TensorQuantOverrides`` for the graph at ``onnx_path``: ``{tensor: [{"rmin", "rmax"}]}``."""
        tensors = graph_tensors(onnx_path, self.probe)
        by_size: dict[int, list[str]] = {}
        for name, value in tensors.items():
            by_size.setdefault(value.size, []).append(name)
        overrides: dict[str, list[dict[str, np.float32]]] = {}
        self.matched = {}
        # a tensor that is one layer's output and the next one's input has two ranges in torch (rounded twice,
        # almost alike); the graph rounds it once: with the output's, which torch applies first
        for key, (value, low, high) in sorted(self.sites.items(), key=lambda kv: kv[0].startswith("out:")):
            flat = value.reshape(-1)
            tol = MATCH_RTOL * (float(np.abs(flat).max()) + 1e-6)
            names = [n for n in by_size.get(flat.size, []) if float(np.abs(tensors[n] - flat).max()) <= tol]
            self.matched[key] = names
            for name in names:
                # onnxruntime reads them as numpy scalars (it takes their dtype)
                overrides[name] = [{"rmin": np.float32(min(low, 0.0)), "rmax": np.float32(max(high, 0.0))}]
        missing = [k for k, names in self.matched.items() if not names]
        log.info("QAT ranges: %d of %d sites matched to %d tensors of %s%s", len(self.sites) - len(missing),
                 len(self.sites), len(overrides), Path(onnx_path).name,
                 f"; unmatched (calibrated instead): {missing[:5]}" if missing else "")
        return overrides


def graph_tensors(onnx_path: str | Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every float tensor of the graph (inputs and outputs of its nodes), flattened, on ``feeds``."""
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    with tempfile.TemporaryDirectory(prefix="clip-qat-ranges-") as tmp:
        augmented = Path(tmp) / "augmented.onnx"
        modify_model_output_intermediate_tensors(str(onnx_path), str(augmented))
        values = collect_activations(str(augmented), [dict(feeds)])
    return {name: np.asarray(batches[0], dtype=np.float64).reshape(-1) for name, batches in values.items()}


def activation_ranges(model, input_name: str, seed: int = 0, batch: int = 4) -> ActivationRanges | None:
    """The QAT ranges of ``model``'s image tower with their site values on a seeded probe, or None.

    ``model.image_tower.qat_ranges`` holds them (set by QAT training, and by loading a student
    directory with ``qat_ranges.json``: :data:`students.qat.QAT_RANGES_FILE`).
    """
    # a PairedStudent holds its image student as image_model
    tower = getattr(model, "image_tower", None) or getattr(getattr(model, "image_model", None), "image_tower", None)
    ranges = getattr(tower, "qat_ranges", None)
    if not ranges:
        return None
    from students.qat import site_values  # torch: imported only for a QAT student (this module is torch-free)

    side = model.image_transform.output_size
    pixels = np.random.default_rng(seed).standard_normal((batch, 3, *side)).astype(np.float32)
    values = site_values(tower, pixels, ranges)
    sites = {k: (v, *ranges[k]) for k, v in values.items()}
    return ActivationRanges(probe={input_name: pixels}, sites=sites)
