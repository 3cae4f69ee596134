"""Accelerated execution paths: what exists on this machine, and how to open a graph on it.

The parity report runs three GPU variants where the pieces for them are installed:

* ``ort-cuda-fp32``: onnxruntime's CUDA execution provider on the fp32 graph (TF32 off);
* ``ort-trt-fp16``: onnxruntime's TensorRT execution provider with ``trt_fp16_enable``;
* ``trt-fp16``: an engine built with the ``tensorrt`` Python API (FP16 flag), run on torch
  CUDA buffers.

Elsewhere :meth:`ProviderInfo.skip_reason` says why a variant cannot run, and the report lists
it as ``skipped: <reason>``; it never makes up a number. A session that asked for a GPU
provider but silently fell back to the CPU (onnxruntime does that when CUDA, cuDNN or TensorRT
libraries fail to load) is caught by :func:`open_ort_session` and skipped the same way.

The GPU code paths follow the onnxruntime and TensorRT documentation but could not be run in
this repository's CI (CPU onnxruntime, no GPU); they are marked ``untested here`` below.
"""

from __future__ import annotations

import ctypes
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from exports.interface import IMAGE_ENCODER
from exports.runtime import OnnxGraph

CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
CPU_EP = "CPUExecutionProvider"
ACCELERATED_VARIANTS = ("ort-cuda-fp32", "ort-trt-fp16", "trt-fp16")
PRECISION_OF = {"ort-cuda-fp32": "fp32", "ort-trt-fp16": "fp16", "trt-fp16": "fp16"}


class ProviderUnavailable(RuntimeError):
    """The variant cannot run here; the message is the reason shown after ``skipped:``."""


@dataclass(frozen=True)
class ProviderInfo:
    """What this process can run on.

    Attributes:
        ort_providers: ``onnxruntime.get_available_providers()``.
        cuda_devices: CUDA devices visible (torch, else the driver library).
        torch_cuda: torch was built with CUDA and sees a device (``trt-fp16`` keeps its buffers there).
        tensorrt_version: the ``tensorrt`` module's version, None when it is not importable.
    """

    ort_providers: tuple[str, ...]
    cuda_devices: int
    torch_cuda: bool
    tensorrt_version: str | None
    onnxruntime_version: str = ort.__version__

    def skip_reason(self, variant: str) -> str | None:
        """None when ``variant`` can be attempted here, else why not."""
        if variant not in ACCELERATED_VARIANTS:
            raise ValueError(f"unknown accelerated variant {variant!r}; expected one of {ACCELERATED_VARIANTS}")
        installed = ", ".join(self.ort_providers)
        if variant == "ort-cuda-fp32" and CUDA_EP not in self.ort_providers:
            return f"onnxruntime has no {CUDA_EP} (installed providers: {installed}); install onnxruntime-gpu"
        if variant == "ort-trt-fp16" and TRT_EP not in self.ort_providers:
            return f"onnxruntime has no {TRT_EP} (installed providers: {installed}); install onnxruntime-gpu and TensorRT"
        if variant == "trt-fp16" and self.tensorrt_version is None:
            return "the tensorrt Python module is not installed (pip install tensorrt)"
        if self.cuda_devices == 0:
            return "no CUDA device is visible"
        if variant == "trt-fp16" and not self.torch_cuda:
            return "torch has no CUDA support (trt-fp16 uses torch CUDA tensors as I/O buffers)"
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _driver_device_count() -> int:
    """CUDA devices according to the driver library, for hosts whose torch is a CPU build."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


def detect() -> ProviderInfo:
    """Inspect onnxruntime, torch, the CUDA driver and the ``tensorrt`` module."""
    import torch

    torch_cuda = bool(torch.cuda.is_available())
    try:
        import tensorrt

        trt_version: str | None = str(tensorrt.__version__)
    except ImportError:
        trt_version = None
    return ProviderInfo(
        ort_providers=tuple(ort.get_available_providers()),
        cuda_devices=torch.cuda.device_count() if torch_cuda else _driver_device_count(),
        torch_cuda=torch_cuda,
        tensorrt_version=trt_version,
    )


def ort_provider_list(variant: str, *, input_shape: tuple[int, ...], max_batch: int, cache_dir: str | Path,
                      device_id: int = 0) -> list:
    """The ``providers=`` list for an onnxruntime variant (untested here: needs onnxruntime-gpu).

    Args:
        input_shape: (3, H, W) of one image; sets TensorRT's optimisation profile so that
            batches 1..``max_batch`` share one engine instead of rebuilding per batch size.
        cache_dir: TensorRT engine cache (building an engine takes minutes for ViT-B).
    """
    # TF32 rounds matmul inputs to 10 mantissa bits; the fp32 gate (max |d| <= 1e-4) needs it off
    cuda = (CUDA_EP, {"device_id": device_id, "use_tf32": 0})
    if variant == "ort-cuda-fp32":
        return [cuda, CPU_EP]
    if variant == "ort-trt-fp16":
        dims = "x".join(str(d) for d in input_shape)
        name = IMAGE_ENCODER.inputs[0].name
        trt = (TRT_EP, {
            "device_id": device_id,
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache_dir),
            "trt_profile_min_shapes": f"{name}:1x{dims}",
            "trt_profile_opt_shapes": f"{name}:{max_batch}x{dims}",
            "trt_profile_max_shapes": f"{name}:{max_batch}x{dims}",
        })
        # nodes TensorRT cannot take fall back to CUDA, then CPU, as the onnxruntime docs advise
        return [trt, cuda, CPU_EP]
    raise ValueError(f"{variant!r} is not an onnxruntime GPU variant")


def open_ort_session(variant: str, onnx_path: str | Path, *, input_shape: tuple[int, ...], max_batch: int,
                     cache_dir: str | Path, threads: int | None = None) -> OnnxGraph:
    """An image-encoder session on the variant's provider (untested here).

    Raises:
        ProviderUnavailable: onnxruntime fell back to another provider (libraries failed to load).
    """
    providers = ort_provider_list(variant, input_shape=input_shape, max_batch=max_batch, cache_dir=cache_dir)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    graph = OnnxGraph(onnx_path, IMAGE_ENCODER, providers=providers, threads=threads)
    wanted = providers[0][0]
    active = graph.session.get_providers()
    if not active or active[0] != wanted:
        raise ProviderUnavailable(
            f"asked onnxruntime for {wanted} but the session runs on {active}: the provider failed to "
            "initialise (check the CUDA, cuDNN and TensorRT libraries onnxruntime-gpu was built for)"
        )
    return graph


class TensorRTEngine:
    """The image encoder as a TensorRT FP16 engine, with the :class:`OnnxGraph`-like ``embed``.

    Untested here (no GPU, no tensorrt): written against the TensorRT 10 Python API
    (``build_serialized_network``, named I/O tensors, ``execute_async_v3``). Buffers are torch
    CUDA tensors, so no pycuda is needed.
    """

    def __init__(self, onnx_path: str | Path, *, input_shape: tuple[int, ...], max_batch: int):
        import tensorrt as trt

        self._trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(Path(onnx_path).read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ProviderUnavailable(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        name = IMAGE_ENCODER.inputs[0].name
        profile.set_shape(name, (1, *input_shape), (max_batch, *input_shape), (max_batch, *input_shape))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ProviderUnavailable(f"TensorRT failed to build an FP16 engine from {onnx_path}")
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        self.context = self.engine.create_execution_context()
        self.max_batch = max_batch

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(pixels), self.max_batch):  # the profile caps the batch
            out.append(self._run(torch.from_numpy(np.ascontiguousarray(pixels[i : i + self.max_batch]))))
        return np.concatenate(out)

    def _run(self, pixels) -> np.ndarray:
        import torch

        x = pixels.to("cuda", torch.float32)
        in_name, out_name = IMAGE_ENCODER.inputs[0].name, IMAGE_ENCODER.outputs[0].name
        self.context.set_input_shape(in_name, tuple(x.shape))
        y = torch.empty(tuple(self.context.get_tensor_shape(out_name)), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(in_name, x.data_ptr())
        self.context.set_tensor_address(out_name, y.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return y.cpu().numpy()
