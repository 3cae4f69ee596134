"""Subjects: the models under test, each a function from pixels to image embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from clipcore.dual_encoder import DualEncoder
from clipcore.flops import image_parameter_tensors
from exports.interface import IMAGE_ENCODER
from exports.runtime import OnnxGraph

Embed = Callable[[np.ndarray], np.ndarray]


@dataclass
class Subject:
    """A model under test: pixels (N, 3, H, W) float32 -> image embeddings (N, D)."""

    name: str
    runtime: str
    precision: str
    role: str
    pixels: str  # which transform feeds it: "teacher" or "student"
    embed: Embed | None
    head: np.ndarray | None = None  # (C, D) unit class embeddings
    logit_scale: float = 1.0
    path: Path | None = None
    owns_file: bool = False  # an artifact this run wrote (deleted when rejected)
    size_bytes: int | None = None
    size_of: str | None = None
    params: int | None = None
    status: str = "pending"
    reason: str | None = None

    @property
    def active(self) -> bool:
        return self.status == "pending"


def torch_embed(model: DualEncoder) -> Embed:
    def embed(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.encode_image(torch.from_numpy(pixels).to(model.device)).float().cpu().numpy()

    return embed


def ort_embed(graph: OnnxGraph) -> Embed:
    name, out = IMAGE_ENCODER.inputs[0].name, IMAGE_ENCODER.outputs[0].name
    return lambda pixels: graph.run({name: pixels}, [out])[out]


def torch_subject(model: DualEncoder, name: str, role: str, pixels: str, head: np.ndarray) -> Subject:
    params = image_parameter_tensors(model)
    return Subject(
        name=name, runtime="torch", precision="fp32", role=role, pixels=pixels, embed=torch_embed(model),
        head=head, logit_scale=float(model.logit_scale.detach().float().item()),
        size_bytes=sum(p.numel() * p.element_size() for p in params),
        size_of="image-tower parameters in memory", params=sum(p.numel() for p in params),
    )


def onnx_subject(name: str, precision: str, path: Path, student: Subject, head: np.ndarray, *,
                 owns_file: bool, threads: int | None, runtime: str = "onnxruntime-cpu", embed: Embed | None = None) -> Subject:
    """An exported image encoder; ``embed`` defaults to an onnxruntime CPU session on ``path``."""
    return Subject(
        name=name, runtime=runtime, precision=precision, role="variant", pixels="student",
        embed=embed or ort_embed(OnnxGraph(path, IMAGE_ENCODER, threads=threads)),
        head=head, logit_scale=student.logit_scale, path=path, owns_file=owns_file,
        size_bytes=path.stat().st_size, size_of="image_encoder .onnx file", params=student.params,
    )


def failed_subject(name: str, precision: str, status: str, reason: str, runtime: str) -> Subject:
    return Subject(name=name, runtime=runtime, precision=precision, role="variant", pixels="student",
                   embed=None, status=status, reason=reason)


def error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
