"""Where a general student's COCO-mini retrieval gap comes from: pixels or fit.

    python benchmarks/embedding_gap.py outputs/general-lowres/final outputs/general/final

Prints the teacher's COCO-mini image->text R@5 with every image first reduced to a short side of
128 / 96 / 64 px (what resolution alone costs it) and the cosine of those embeddings to its own at
full size (the most a 64 px student could keep), then, per student, its R@5 and its mean cosine
to the teacher's embeddings on COCO-mini (also split by whether a caption names a person: content
Tiny-ImageNet hardly has), on 1,000 seeded Tiny-ImageNet validation images and on
2x2 mosaics of them (four images in one frame: a crude stand-in for the multi-object scenes of COCO
that the students never train on; each tile is half the side, so compare with the single images
reduced to 32 px too). A diagnosis, not a selection signal: COCO-mini is a test set (issue 11).
"""

from __future__ import annotations

import re
import sys

import torch
from PIL import Image

from clipcore.data import ImageDataset, make_loader
from clipcore.imaging import decode_image
from distill.benchmark import score_of
from distill.evaluate import embed_images, retrieval_eval
from distill.mosaics import compose
from distill.suite import parse_suite, prepare_entry
from students import load_model

TEACHER = "outputs/reference-zeroshot/final"
COCO = {"name": "coco", "data": "../shared/data/coco-mini", "split": "train", "task": "retrieval",
        "metric": "image_to_text_R@5"}
PERSON = re.compile(r"\b(person|people|man|men|woman|women|boys?|girls?|child|children|kids?|players?|skier|"
                    r"surfer|guy|lady|crowd|someone|skateboarder|snowboarder|rider)\b", re.IGNORECASE)
TINY = {"name": "tiny", "data": "../shared/data/tiny-imagenet", "split": "validation", "task": "zeroshot",
        "classnames": "../shared/data/tiny-imagenet/words.json", "templates": "openai_cifar", "limit": 1000}


def mosaic_view(prepared):
    """Row i -> a 2x2 frame of rows i, i+251, i+502, i+753 (mod n), each at half the side."""
    n, column = len(prepared.ds), prepared.columns.image

    def view(image, row):
        tiles = [image] + [decode_image(prepared.ds[(row + 251 * k) % n][column]) for k in (1, 2, 3)]
        return compose(tiles, grid=2, tile=min(image.size) // 2)
    return view


def halved_view(image, _row):
    side = min(image.size) // 2  # the single image at a mosaic tile's resolution, enlarged back
    return image.convert("RGB").resize((side, side), Image.BICUBIC).resize(image.size, Image.BICUBIC)


def short_side_view(side: int):
    """The image resized (bicubic, aspect kept) to a short side of ``side`` pixels."""
    def view(image, _row):
        scale = side / min(image.size)
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        return image.convert("RGB").resize(size, Image.BICUBIC)
    return view


def embed(model, prepared, view=None):
    ds = ImageDataset(prepared.ds, {"model": model.image_transform}, prepared.columns, name="gap", view=view)
    return embed_images(model, make_loader(ds, 64), progress=False)


def r_at_5(model, coco, images) -> float:
    return score_of(retrieval_eval(model, images, coco.texts, coco.text_to_image), "image_to_text_R@5")


def row_cos(a, b) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b))


def with_people(coco) -> torch.Tensor:
    """Per COCO-mini image: does any of its captions name a person?"""
    mask = torch.zeros(len(coco.ds), dtype=torch.bool)
    for text, image in zip(coco.texts, coco.text_to_image):
        mask[image] |= bool(PERSON.search(text))
    return mask


def main(students: list[str]) -> None:
    coco, tiny = (prepare_entry(e) for e in parse_suite([COCO, TINY]))
    teacher = load_model(TEACHER).eval()
    targets = {}
    for side in (None, 128, 96, 64):
        images = embed(teacher, coco, short_side_view(side) if side else None)
        targets.setdefault("coco", images.embeddings)
        cos = row_cos(images.embeddings, targets["coco"]).mean().item()
        print(f"teacher, COCO-mini short side {side or 'full'}: R@5 {r_at_5(teacher, coco, images):.3f}, "
              f"cosine to full size {cos:.3f}", flush=True)
    people = with_people(coco)
    print(f"COCO-mini: {int(people.sum())} of {len(people)} images have a caption naming a person", flush=True)
    views = {"coco": (coco, None), "tiny": (tiny, None), "tiny at half side": (tiny, halved_view),
             "tiny 2x2 mosaics": (tiny, mosaic_view(tiny))}
    for name, (prepared, view) in views.items():
        if name != "coco":
            targets[name] = embed(teacher, prepared, view=view).embeddings
    for path in students:
        student = load_model(path).eval()
        for name, (prepared, view) in views.items():
            images = embed(student, prepared, view=view)
            cos = row_cos(images.embeddings, targets[name])
            extra = (f", R@5 {r_at_5(student, coco, images):.3f}; with people {cos[people].mean():.3f}, "
                     f"without {cos[~people].mean():.3f}" if name == "coco" else "")
            print(f"{path}, {name}: cosine to the teacher {cos.mean():.3f}{extra}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
