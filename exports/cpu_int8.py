"""Which int8 dot product the CPU offers, read from /proc/cpuinfo: it decides whether onnxruntime's
u8s8 int8 kernels are exact here. Torch- and onnxruntime-free, so the quantiser and the parity
report both ask it."""

from __future__ import annotations

from pathlib import Path

SATURATING = "avx2 without vnni"  # how cpu_int8_dot starts on a CPU whose u8s8 kernels saturate


def cpu_int8_dot(cpuinfo: str | None = None) -> str:
    """The x86 CPU's int8 dot-product instructions, as onnxruntime's u8s8 kernels use them.

    Without VNNI, the AVX2/AVX-512 u8s8 path sums pairs of uint8 x int8 products in int16 and
    saturates: the same int8 QDQ file agrees less with fp32 here than on a VNNI or ARM device
    (docs/edge-bundle.md measures it). The parity report records it because its int8 verdict holds
    for CPUs of this kind.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.lower().startswith(("flags", "features"))), None)
    if flags is None:
        return "unknown"
    vnni = [f for f in ("avx512_vnni", "avx_vnni") if f in flags]
    if vnni:
        return f"vnni ({', '.join(vnni)})"
    if "asimddp" in flags:
        return "arm dot product (asimddp)"
    if "avx2" in flags:
        return SATURATING + ": u8s8 int8 may saturate"
    return "none found"


def saturates(dot: str) -> bool:
    """Whether a :func:`cpu_int8_dot` answer (as a parity report recorded it) is a saturating CPU's."""
    return dot.startswith(SATURATING)
