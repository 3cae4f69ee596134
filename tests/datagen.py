"""Small synthetic datasets written by tests (parquet with Image/ClassLabel/captions)."""

import io

import datasets
import numpy as np
from PIL import Image


def png(seed: int, size=(40, 30), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def write_labelled(root, n=24):
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "car"])})
    rows = {"image": [{"bytes": png(i, mode="L" if i % 5 == 0 else "RGB"), "path": None} for i in range(n)],
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
