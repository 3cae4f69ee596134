"""Quantisation-aware training: fake-quantise a student where its static int8 ONNX export will.

Post-training int8 (``exports.precision.quantize_int8_static``: per-channel int8 weights, uint8
activations with calibrated min/max ranges, QDQ) rounds every convolution's weights and every
tensor between them. A student trained in fp32 never saw that rounding; on the general student
(EfficientNet-Lite0 at 64 px) it cost 6 % top-1 agreement on 200 classes. QAT fine-tunes the
fp32 weights with the rounding in the forward pass (straight-through gradients), placed as the
QDQ export places it:

* **weights** of every ``Conv2d`` and ``Linear``: symmetric int8 per output channel, scale
  ``max|w| / 127`` (onnxruntime's per-channel symmetric weights);
* **activations**: the input of every ``Conv2d``/``Linear`` and its output, taken after the
  batch norm that the export folds into it and after a following ReLU/ReLU6 (the export drops the
  activation into the range: ``STATIC_OP_TYPES``); uint8, asymmetric, the range always holding 0.
  Each range is the moving average of the batch min/max (a training batch of 128 is the size of
  the export's calibration set, so the averages match what calibration will see);
* **batch norms** are folded into the convolution before (the conv's weights scaled, the norm left
  as ``x + bias`` with identity statistics, so the saved model has the same keys and the export
  folds it away exactly) and stay in eval mode.

With ``learned=True`` (``qat.ranges: learned``) each range, once the first batch has set it, is a learned
scale and zero point instead (LSQ, Esser et al. 2020, through torch's learnable fake-quantise): the
weights and the clipping points learn together, so a range may give up a rare outlier for a finer step.

``strip`` leaves plain fp32 weights on their int8 grids (the saved model is an ordinary student, and
static int8 export quantises its weights without loss), quantised by ``quantize_int8_static`` as any
other: only the activations are rounded at export (on the general student, weights on the grid
raised int8's top-1 agreement with the fp32 model from 94.4 to 95.8 % on 500 Tiny-ImageNet images). The call graph is read by running the model
once with hooks (:func:`trace_calls`): which module's output feeds which, by tensor identity.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

WEIGHT_QMAX = 127  # symmetric int8 weights: [-127, 127]
ACT_QMIN, ACT_QMAX = 0, 255  # uint8 activations
QUANT_LAYERS = (nn.Conv2d, nn.Linear)
ACTIVATIONS = (nn.ReLU, nn.ReLU6)
QAT_RANGES_FILE = "qat_ranges.json"  # a QAT student's activation ranges, beside its weights


@dataclass
class Call:
    """One module call seen by :func:`trace_calls`: the ids of its tensor input and output."""

    name: str
    module: nn.Module
    input_id: int
    output_id: int


def trace_calls(model: nn.Module, run: Callable[[], object]) -> list[Call]:
    """The leaf-module calls of one ``run()`` in order (``run`` calls ``model`` on an example)."""
    calls: list[Call] = []
    keep: list[torch.Tensor] = []  # keep tensors alive: ids must not be reused within the run

    def hook(name: str):
        def record(module, args, output):
            if args and torch.is_tensor(args[0]) and torch.is_tensor(output):
                keep.extend((args[0], output))
                calls.append(Call(name, module, id(args[0]), id(output)))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in traced_modules(model)]
    was_training = model.training
    model.eval()  # a train-mode norm would update its running statistics from the example
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls


def traced_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules, and every conv/linear/norm/activation even with children (EfficientNet's
    ``Conv2dStaticSamePadding`` holds its padding as a child), but nothing inside a conv or linear."""
    kinds = (*QUANT_LAYERS, nn.BatchNorm2d, *ACTIVATIONS)
    out, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, QUANT_LAYERS):
            inside.append(name)
        if isinstance(module, kinds) or not list(module.children()):
            out.append((name, module))
    return out


def _consumers(calls: list[Call]) -> dict[int, list[Call]]:
    out: dict[int, list[Call]] = {}
    for call in calls:
        out.setdefault(call.input_id, []).append(call)
    return out


def conv_norm_pairs(calls: list[Call]) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Each ``Conv2d`` whose output feeds only a ``BatchNorm2d``, with that norm (what export folds)."""
    users = _consumers(calls)
    pairs = []
    for call in calls:
        if isinstance(call.module, nn.Conv2d):
            nxt = users.get(call.output_id, [])
            if len(nxt) == 1 and isinstance(nxt[0].module, nn.BatchNorm2d):
                pairs.append((call.module, nxt[0].module))
    return pairs


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """Scale ``conv``'s weights by the norm and leave the norm as ``x + bias`` (identity statistics).

    Exact in eval mode: ``norm(conv(x))`` is unchanged, and the state dict keeps its keys.
    """
    if norm.running_var is None or norm.running_mean is None or not norm.affine:
        raise ValueError("QAT folds batch norms with running statistics and an affine bias; this one lacks them")
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
    shift = norm.bias - norm.running_mean * scale
    if conv.bias is not None:  # fold the conv's own bias into the norm's, which stays the only bias
        shift = shift + conv.bias * scale
        conv.bias.zero_()
    norm.running_mean.zero_()
    norm.running_var.fill_(1.0 - norm.eps)
    norm.weight.fill_(1.0)
    norm.bias.copy_(shift)


def _eval_batchnorm(norm: nn.BatchNorm2d) -> Callable[[torch.Tensor], torch.Tensor]:
    """A forward that always uses the running statistics (a folded norm is not re-estimated)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                                        False, 0.0, norm.eps)
    return forward


class FakeQuantWeight(nn.Module):
    """Parametrisation: per-output-channel symmetric int8 rounding of a weight, straight-through."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.detach().reshape(weight.shape[0], -1).abs().amax(dim=1)
        scale = (flat / WEIGHT_QMAX).clamp_min(1e-12).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -WEIGHT_QMAX, WEIGHT_QMAX)


def uint8_grid(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The step and zero point (fp32 tensors of shape ``(1,)``) of the uint8 grid spanning ``[low, high]``.

    Both range kinds round to it: the observed range every forward pass, the learned range when it starts. Computed
    in fp32, so bf16 ranges (observed under autocast) give the grid of their fp32 values.
    """
    low, high = low.float(), high.float()
    scale = ((high - low) / (ACT_QMAX - ACT_QMIN)).clamp_min(1e-8).reshape(1)
    return scale, torch.round(ACT_QMIN - low / scale).clamp(ACT_QMIN, ACT_QMAX).reshape(1)


class LearnedRange(nn.Module):
    """A uint8 range as a learned scale and zero point (LSQ): ``qat.ranges: learned``.

    The gradient to the scale is LSQ's (the rounding error inside the range, the clipping outside it), scaled by
    ``1 / sqrt(elements x 255)`` as the paper does; the zero point learns too and rounds as onnxruntime's does.
    """

    def __init__(self, device: torch.device | None = None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, device=device))
        self.zero_point = nn.Parameter(torch.zeros(1, device=device))

    def set(self, low: torch.Tensor, high: torch.Tensor) -> None:
        with torch.no_grad():
            scale, zero = uint8_grid(low, high)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero)

    def bounds(self) -> tuple[float, float]:
        """``(low, high)`` of the integer grid this range rounds to now (what the export writes)."""
        scale = float(self.scale.detach().abs().clamp_min(1e-8))
        zero = float(self.zero_point.detach().round().clamp(ACT_QMIN, ACT_QMAX))
        return (ACT_QMIN - zero) * scale, (ACT_QMAX - zero) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # keep the grid valid: a positive step, a zero point on uint8
            self.scale.abs_().clamp_min_(1e-8)
            self.zero_point.clamp_(ACT_QMIN, ACT_QMAX)
        grad_factor = 1.0 / (x.numel() * ACT_QMAX) ** 0.5
        return torch._fake_quantize_learnable_per_tensor_affine(x, self.scale, self.zero_point, ACT_QMIN, ACT_QMAX,
                                                               grad_factor)


@dataclass
class ActivationQuant:
    """A uint8 range observed as the moving average of batch min/max; fake-quantises a tensor.

    Ranges update only when gradients are enabled (training steps), so evaluation and export
    passes see fixed ranges.
    """

    momentum: float = 0.01
    low: torch.Tensor | None = None
    high: torch.Tensor | None = None
    key: str = ""  # where it sits (site_key): saved with its range, matched to an ONNX tensor at export
    bypass: bool = False  # QATHandle.float_activations: pass the tensor through unrounded and unobserved
    learned: LearnedRange | None = None  # qat.ranges=learned: set from the first batch's min/max, then trained

    def observe(self, x: torch.Tensor) -> None:
        low, high = x.detach().amin().clamp_max(0.0), x.detach().amax().clamp_min(0.0)
        if self.low is None:
            self.low, self.high = low, high
        else:
            self.low = self.low + self.momentum * (low - self.low)
            self.high = self.high + self.momentum * (high - self.high)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return x
        if self.learned is not None:
            if self.low is None:  # its first batch (or reset_ranges): the learned range starts at its min/max
                self.observe(x)
                self.learned.set(self.low, self.high)
            return self.learned(x)
        if torch.is_grad_enabled() or self.low is None:
            self.observe(x)
        scale, zero = uint8_grid(self.low, self.high)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero.to(torch.int32), ACT_QMIN, ACT_QMAX)


@dataclass
class QATHandle:
    """What :func:`prepare_qat` attached; :meth:`strip` removes it and leaves fp32 weights."""

    model: nn.Module
    layers: list[nn.Module] = field(default_factory=list)
    folded: int = 0
    observers: list[ActivationQuant] = field(default_factory=list)
    handles: list = field(default_factory=list)
    norms: list[nn.BatchNorm2d] = field(default_factory=list)
    # qat.ranges=learned: every observer's LearnedRange, for the optimiser (the trainer registers it on its task)
    range_module: nn.ModuleList | None = None

    def strip(self, rounded: bool = True) -> None:
        """Remove the hooks; ``rounded`` leaves each weight on its int8 grid (the values it will run as:
        static int8 export then quantises the weights without loss), else the fp32 weights under them."""
        for h in self.handles:
            h.remove()
        for layer in self.layers:
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=rounded)
        for norm in self.norms:
            norm.__dict__.pop("forward", None)
        self.handles, self.layers, self.norms = [], [], []

    @contextmanager
    def float_activations(self) -> Iterator[None]:
        """Within: activations pass unrounded (ranges untouched), weights stay on their int8 grids: the model
        :meth:`strip` will leave, which the int8 export is checked against (``qat.consistency``)."""
        for observer in self.observers:
            observer.bypass = True
        try:
            yield
        finally:
            for observer in self.observers:
                observer.bypass = False

    def ranges(self) -> dict[str, list[float]]:
        """``{site key: [low, high]}`` of every activation range set so far: what the export should use
        instead of recalibrating (``exports.qat_ranges``), so the int8 graph rounds as training did."""
        return {o.key: (list(o.learned.bounds()) if o.learned is not None else [float(o.low), float(o.high)])
                for o in self.observers if o.low is not None}

    def reset_ranges(self) -> None:
        """Forget the activation ranges: the next forward sets them afresh."""
        for observer in self.observers:
            observer.low = observer.high = None

    def set_ranges(self, ranges: Mapping[str, list[float]], source: str = "<ranges>") -> None:
        """Put back ranges saved by :meth:`ranges` (a checkpoint's): the moving averages go on from them.

        Raises:
            ValueError: ``ranges`` names other sites than this model's observers (naming ``source``).
        """
        keys = {o.key for o in self.observers}
        if set(ranges) - keys:
            raise ValueError(f"{source}: QAT ranges for sites this model does not have: {sorted(set(ranges) - keys)[:5]}")
        device = next(self.model.parameters()).device
        for observer in self.observers:
            low_high = ranges.get(observer.key)
            observer.low, observer.high = ((None, None) if low_high is None
                                           else (torch.tensor(float(v), device=device) for v in low_high))
            if observer.learned is not None and observer.low is not None:
                observer.learned.set(observer.low, observer.high)

    def summary(self) -> str:
        learned = " (learned)" if self.range_module is not None else ""
        return (f"QAT: {len(self.layers)} conv/linear layers with int8 weights, {len(self.observers)} uint8 "
                f"activation ranges{learned}, {self.folded} batch norms folded")


def _output_site(call: Call, users: dict[int, list[Call]]) -> Call:
    """Where the export quantises ``call``'s output: after a folded norm and a ReLU/ReLU6."""
    site = call
    for kinds in ((nn.BatchNorm2d,), ACTIVATIONS):
        nxt = users.get(site.output_id, [])
        if len(nxt) == 1 and isinstance(nxt[0].module, kinds):
            site = nxt[0]
    return site


def site_key(kind: str, name: str, index: int = 0) -> str:
    """The name of an activation range: ``in:<module>`` (the input of every call of a conv/linear) or
    ``out:<module>#<call>`` (the output of that call of the module where the export quantises it)."""
    return f"in:{name}" if kind == "in" else f"out:{name}#{index}"


def parse_site_key(key: str) -> tuple[str, str]:
    """``(kind, module name)`` of a :func:`site_key`: ``("in", name)`` or ``("out", name)``."""
    kind, _, rest = key.partition(":")
    return kind, rest.rsplit("#", 1)[0] if kind == "out" else rest


def prepare_qat(model: nn.Module, run: Callable[[], object], *, momentum: float = 0.01,
                learned: bool = False) -> QATHandle:
    """Fold ``model``'s batch norms and fake-quantise it in place as static QDQ int8 will.

    Args:
        model: the module to quantise (an image tower); every ``Conv2d``/``Linear`` it calls.
        run: calls ``model`` on an example batch (read twice: the call graph, then first ranges).
        momentum: of the activation ranges' moving average.
        learned: each range a :class:`LearnedRange` (``handle.range_module``'s parameters) once first set.

    Raises:
        ValueError: ``run`` calls no ``Conv2d``/``Linear`` of ``model``.
    """
    calls = trace_calls(model, run)
    handle = QATHandle(model)
    for conv, norm in conv_norm_pairs(calls):
        fold_batchnorm(conv, norm)
        norm.forward = _eval_batchnorm(norm)
        handle.norms.append(norm)
    handle.folded = len(handle.norms)
    users = _consumers(calls)
    # a module may be called more than once per forward (EfficientNet's blocks share one ReLU6):
    # each call whose output the export quantises gets its own range, by call index
    seen: dict[int, int] = {}
    call_index = {}  # id(call) -> how many calls of its module came before it in one forward
    for call in calls:
        call_index[id(call)] = seen[id(call.module)] = seen.get(id(call.module), -1) + 1
    site_calls: dict[int, dict[int, ActivationQuant]] = {}
    site_modules: dict[int, nn.Module] = {}
    for call in calls:
        if not isinstance(call.module, QUANT_LAYERS):
            continue
        if call.module not in handle.layers:
            handle.layers.append(call.module)
            parametrize.register_parametrization(call.module, "weight", FakeQuantWeight())
            observer = ActivationQuant(momentum, key=site_key("in", call.name))
            handle.observers.append(observer)
            handle.handles.append(call.module.register_forward_pre_hook(_quant_input(observer)))
        site = _output_site(call, users)
        per_call = site_calls.setdefault(id(site.module), {})
        site_modules[id(site.module)] = site.module
        if call_index[id(site)] not in per_call:
            per_call[call_index[id(site)]] = ActivationQuant(momentum, key=site_key("out", site.name, call_index[id(site)]))
            handle.observers.append(per_call[call_index[id(site)]])
    counters = {key: 0 for key in site_calls}
    handle.handles.append(model.register_forward_pre_hook(lambda module, args: counters.update(dict.fromkeys(counters, 0))))
    for key, per_call in site_calls.items():
        handle.handles.append(site_modules[key].register_forward_hook(_quant_output(per_call, counters, key)))
    if not handle.layers:
        handle.strip()
        raise ValueError(f"QAT: the example run calls no Conv2d/Linear of {type(model).__name__}")
    if learned:
        device = next(model.parameters()).device
        for observer in handle.observers:
            observer.learned = LearnedRange(device)
        handle.range_module = nn.ModuleList(o.learned for o in handle.observers)
    with torch.no_grad():
        run()  # first ranges, so that an evaluation before any training step is quantised too
    return handle


def _quant_input(observer: ActivationQuant):
    def hook(module, args):
        return (observer(args[0]), *args[1:])
    return hook


def _quant_output(per_call: dict[int, ActivationQuant], counters: dict[int, int], key: int):
    def hook(module, args, output):
        i = counters[key]
        counters[key] = i + 1
        observer = per_call.get(i)
        return output if observer is None else observer(output)
    return hook


def site_values(tower: nn.Module, pixels: np.ndarray, keys: Collection[str]) -> dict[str, np.ndarray]:
    """The fp32 tensor at each site (:func:`site_key`) when ``tower`` runs on ``pixels``: what
    ``exports.qat_ranges`` matches to the ONNX graph's tensors."""
    modules = dict(tower.named_modules())
    found: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    handles = []

    def pre(key: str):
        def hook(module, args):
            found.setdefault(key, args[0].detach().float().numpy().copy())
        return hook

    def post(name: str):
        def hook(module, args, output):
            key = site_key("out", name, counts.get(name, 0))
            counts[name] = counts.get(name, 0) + 1
            if key in keys and torch.is_tensor(output):
                found.setdefault(key, output.detach().float().numpy().copy())
        return hook

    hooked: set[str] = set()
    for key in keys:
        kind, name = parse_site_key(key)
        if name not in modules:
            raise ValueError(f"QAT range {key!r}: the image tower has no module {name!r} (ranges of another model?)")
        if kind == "in":
            handles.append(modules[name].register_forward_pre_hook(pre(key)))
        elif name not in hooked:  # one hook per module counts all its calls
            hooked.add(name)
            handles.append(modules[name].register_forward_hook(post(name)))
    was_training = tower.training
    tower.eval()
    try:
        with torch.no_grad():
            tower(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)))
    finally:
        for h in handles:
            h.remove()
        tower.train(was_training)
    return found


def save_ranges(ranges: Mapping[str, list[float]], directory: str | Path) -> Path:
    """Write ``{site key: [low, high]}`` to ``directory``/:data:`QAT_RANGES_FILE`."""
    path = Path(directory) / QAT_RANGES_FILE
    path.write_text(json.dumps(dict(ranges), indent=1))
    return path


def load_ranges(directory: str | Path) -> dict[str, list[float]] | None:
    """The ranges saved with a student directory, or None (not a QAT student).

    Raises:
        ValueError: the file is not a JSON object of ``key: [low, high]`` (naming the file).
    """
    path = Path(directory) / QAT_RANGES_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    bad = [k for k, v in raw.items() if not (isinstance(v, list) and len(v) == 2
                                             and all(isinstance(x, (int, float)) for x in v) and v[0] <= v[1])] \
        if isinstance(raw, dict) else ["<the file is not a JSON object>"]
    if bad:
        raise ValueError(f"{path}: expected {{site: [low, high]}} with low <= high; bad entries {bad[:5]}")
    return {k: [float(v[0]), float(v[1])] for k, v in raw.items()}
