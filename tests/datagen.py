"""Small synthetic datasets written by tests (parquet with Image/ClassLabel/captions)."""

import io

import datasets
import numpy as np
from PIL import Image


def png(seed: int, size=(40, 30), mode="RGB", tint: int | None = None) -> bytes:
    """A noise image; ``tint`` (0, 1, 2) makes that colour channel dominate, so classes are learnable."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    if tint is not None:
        arr = (arr // 4).astype(np.uint8)
        arr[..., tint] += 180
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def write_labelled(root, n=24, tinted=False):
    """Parquet train/test splits with 3 classes, grayscale rows and one corrupt row (index 3)."""
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "car"])})
    mode = (lambda i: "RGB") if tinted else (lambda i: "L" if i % 5 == 0 else "RGB")
    tint = (lambda i: i % 3) if tinted else (lambda i: None)
    rows = {"image": [{"bytes": png(i, mode=mode(i), tint=tint(i)), "path": None} for i in range(n)],
            "label": [i % 3 for i in range(n)]}
    rows["image"][3] = {"bytes": b"not an image", "path": "broken.png"}
    for split in ("train", "test"):
        datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
    return root


def write_captions(root, n=12):
    feats = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))})
    rows = {"image": [{"bytes": png(100 + i), "path": None} for i in range(n)],
            "captions": [[f"picture number {i}", f"another view {i}"][: 1 + i % 2] for i in range(n)]}
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(root / "train-00000-of-00001.parquet"))
    return root
