"""Image decoding and per-model preprocessing with PIL and numpy only.

This module deliberately imports neither torch nor transformers: the edge runtime in
`exports/runtime.py` reuses it on devices that ship only onnxruntime, numpy and pillow.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE_NAMES = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_RESAMPLE_BY_VALUE = {int(v): k for k, v in _RESAMPLE_NAMES.items()}


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message names the source."""


def _high_bit_depth_to_uint8(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float grayscale to 8 bits by range, not by clipping.

    PIL's own ``convert("L")`` on mode ``I;16``/``I`` clips at 255, which turns almost every
    16-bit photo white; scaling by the type's range keeps the picture.
    """
    arr = np.asarray(image)
    if image.mode == "F":
        peak = float(np.nanmax(arr)) if arr.size else 1.0
        scale = 255.0 if peak <= 1.0 else (255.0 / 65535.0 if peak > 255.0 else 1.0)
        out = np.nan_to_num(arr.astype(np.float64) * scale)
    else:
        # mode I;16* always holds 0..65535 (even a dark image); mode I (32-bit) is ambiguous:
        # PIL opens 16-bit PNGs that way, so only values above 255 reveal a 16-bit range.
        out = arr.astype(np.float64)
        if image.mode.startswith("I;16") or (out.size and out.max() > 255):
            out = out / 257.0
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Return an 8-bit RGB image whatever the input mode.

    Transparent pixels are composited over ``background`` (white) instead of being dropped,
    which is what ``convert("RGB")`` does and which turns transparent areas black.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _high_bit_depth_to_uint8(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(value: Any, source: str = "<image>", max_pixels: int | None = None) -> Image.Image:
    """Decode a datasets ``Image`` value (dict with bytes/path), raw bytes, a path or a PIL image.

    Args:
        max_pixels: refuse an image with more pixels, from its header, before it is decoded.

    Raises:
        ImageDecodeError: naming ``source`` when the data is not a readable image or is too large.
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, Mapping):
            if value.get("bytes") is not None:
                source = value.get("path") or source
                image = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                source = value["path"]
                image = Image.open(value["path"])
            else:
                raise ImageDecodeError(f"{source}: image value has neither bytes nor path")
        elif isinstance(value, (str, os.PathLike)):
            source = os.fspath(value)
            image = Image.open(source)
        else:
            raise ImageDecodeError(f"{source}: unsupported image value of type {type(value).__name__}")
        w, h = image.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageDecodeError(f"{source}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} (--max-pixels)")
        image.load()  # force the decode here so truncated files fail now, not in a worker later
        return to_rgb(image)
    except ImageDecodeError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise ImageDecodeError(f"{source}: cannot decode image ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class ImageTransform:
    """Resize, centre-crop, rescale and normalise, as a model's image processor specifies.

    Attributes:
        size: shortest-edge length (int) or exact (height, width).
        crop_size: (height, width) of the centre crop, or None for no crop.
        mean, std: per-channel normalisation after rescaling to [0, 1].
        resample: PIL resampling filter name.
    """

    size: int | tuple[int, int] = 224
    crop_size: tuple[int, int] | None = (224, 224)
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: str = "bicubic"
    rescale_factor: float = 1.0 / 255.0

    def __post_init__(self) -> None:
        if self.resample not in _RESAMPLE_NAMES:
            raise ValueError(f"resample={self.resample!r}; expected one of {sorted(_RESAMPLE_NAMES)}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean/std need 3 channels, got mean={self.mean} std={self.std}")

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the produced array."""
        if self.crop_size is not None:
            return tuple(self.crop_size)  # type: ignore[return-value]
        if isinstance(self.size, int):
            raise ValueError("a shortest-edge resize without a crop has no fixed output size")
        return tuple(self.size)  # type: ignore[return-value]

    def resize(self, image: Image.Image) -> Image.Image:
        resample = _RESAMPLE_NAMES[self.resample]
        if isinstance(self.size, int):
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.size * long / short)
            new = (self.size, new_long) if w <= h else (new_long, self.size)
            return image if new == (w, h) else image.resize(new, resample=resample)
        h, w = self.size
        return image if image.size == (w, h) else image.resize((w, h), resample=resample)

    def crop(self, image: Image.Image) -> Image.Image:
        if self.crop_size is None:
            return image
        ch, cw = self.crop_size
        w, h = image.size
        if w < cw or h < ch:  # pad like transformers' center_crop does for small inputs
            canvas = Image.new("RGB", (max(w, cw), max(h, ch)))
            canvas.paste(image, ((max(w, cw) - w) // 2, (max(h, ch) - h) // 2))
            image, (w, h) = canvas, canvas.size
        top, left = (h - ch) // 2, (w - cw) // 2
        return image.crop((left, top, left + cw, top + ch))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Preprocess one RGB image into a float32 array of shape (3, H, W)."""
        image = self.crop(self.resize(to_rgb(image)))
        arr = np.asarray(image, dtype=np.float32) * np.float32(self.rescale_factor)
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["crop_size"] = list(self.crop_size) if self.crop_size is not None else None
        d["size"] = self.size if isinstance(self.size, int) else list(self.size)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ImageTransform":
        unknown = set(d) - {"size", "crop_size", "mean", "std", "resample", "rescale_factor"}
        if unknown:
            raise ValueError(f"unknown image transform keys {sorted(unknown)}")
        size = d.get("size", 224)
        crop = d.get("crop_size")
        return cls(
            size=size if isinstance(size, int) else tuple(size),
            crop_size=tuple(crop) if crop is not None else None,
            mean=tuple(d.get("mean", OPENAI_CLIP_MEAN)),
            std=tuple(d.get("std", OPENAI_CLIP_STD)),
            resample=d.get("resample", "bicubic"),
            rescale_factor=float(d.get("rescale_factor", 1.0 / 255.0)),
        )

    @classmethod
    def from_processor_config(cls, cfg: Mapping[str, Any]) -> "ImageTransform":
        """Build from a Hugging Face ``preprocessor_config.json`` dict (CLIP, SigLIP, ViT, ConvNeXt...)."""
        size_cfg = cfg.get("size", 224)
        if isinstance(size_cfg, Mapping):
            if "shortest_edge" in size_cfg:
                size: int | tuple[int, int] = int(size_cfg["shortest_edge"])
            else:
                size = (int(size_cfg["height"]), int(size_cfg["width"]))
        else:
            size = int(size_cfg)
        crop = None
        if cfg.get("do_center_crop", True) and cfg.get("crop_size") is not None:
            c = cfg["crop_size"]
            crop = (int(c["height"]), int(c["width"])) if isinstance(c, Mapping) else (int(c), int(c))
        elif isinstance(size, int):
            crop = (size, size)
        if crop is None and isinstance(size, tuple):
            crop = size
        resample = cfg.get("resample", 3)
        resample_name = _RESAMPLE_BY_VALUE.get(int(resample), "bicubic") if not isinstance(resample, str) else resample
        mean = cfg.get("image_mean", OPENAI_CLIP_MEAN)
        std = cfg.get("image_std", OPENAI_CLIP_STD)
        mean = (mean,) * 3 if isinstance(mean, (int, float)) else mean
        std = (std,) * 3 if isinstance(std, (int, float)) else std
        if not cfg.get("do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(
            size=size,
            crop_size=crop,
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            resample=resample_name,
            rescale_factor=float(cfg.get("rescale_factor", 1.0 / 255.0)) if cfg.get("do_rescale", True) else 1.0,
        )

    def with_size(self, side: int) -> "ImageTransform":
        """The same normalisation at another square resolution (for students at native size)."""
        return ImageTransform(side, (side, side), self.mean, self.std, self.resample, self.rescale_factor)
