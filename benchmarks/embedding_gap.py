"""Where a general student's COCO-mini retrieval gap comes from: pixels or fit.

    python benchmarks/embedding_gap.py outputs/general-lowres/final outputs/general/final

Prints the teacher's COCO-mini image->text R@5 with every image first reduced to a short side of
128 / 96 / 64 px (what resolution alone costs it), then, per student, its R@5 and its mean cosine
to the teacher's embeddings on COCO-mini and on 1,000 seeded Tiny-ImageNet validation images.
A diagnosis, not a selection signal: COCO-mini is a test set (issue 11).
"""

from __future__ import annotations

import sys

import torch
from PIL import Image

from clipcore.data import ImageDataset, make_loader
from distill.benchmark import score_of
from distill.evaluate import embed_images, retrieval_eval
from distill.suite import parse_suite, prepare_entry
from students import load_model

TEACHER = "outputs/reference-zeroshot/final"
COCO = {"name": "coco", "data": "../shared/data/coco-mini", "split": "train", "task": "retrieval",
        "metric": "image_to_text_R@5"}
TINY = {"name": "tiny", "data": "../shared/data/tiny-imagenet", "split": "validation", "task": "zeroshot",
        "classnames": "../shared/data/tiny-imagenet/words.json", "templates": "openai_cifar", "limit": 1000}


def embed(model, prepared, short_side: int | None = None):
    view = None
    if short_side:
        def view(image, _row):
            image = image.convert("RGB")
            scale = short_side / min(image.size)
            return image.resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))),
                                Image.BICUBIC)
    ds = ImageDataset(prepared.ds, {"model": model.image_transform}, prepared.columns, name="gap", view=view)
    return embed_images(model, make_loader(ds, 64), progress=False)


def r_at_5(model, coco, images) -> float:
    return score_of(retrieval_eval(model, images, coco.texts, coco.text_to_image), "image_to_text_R@5")


def main(students: list[str]) -> None:
    coco, tiny = (prepare_entry(e) for e in parse_suite([COCO, TINY]))
    teacher = load_model(TEACHER).eval()
    targets = {}
    for side in (None, 128, 96, 64):
        images = embed(teacher, coco, side)
        targets.setdefault("coco", images.embeddings)
        print(f"teacher, COCO-mini short side {side or 'full'}: R@5 {r_at_5(teacher, coco, images):.3f}", flush=True)
    targets["tiny"] = embed(teacher, tiny).embeddings
    for path in students:
        student = load_model(path).eval()
        for name, prepared in (("coco", coco), ("tiny", tiny)):
            images = embed(student, prepared)
            cos = torch.nn.functional.cosine_similarity(torch.as_tensor(images.embeddings),
                                                        torch.as_tensor(targets[name])).mean().item()
            extra = f", R@5 {r_at_5(student, coco, images):.3f}" if name == "coco" else ""
            print(f"{path}, {name}: cosine to the teacher {cos:.3f}{extra}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
