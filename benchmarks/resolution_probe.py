"""How much of a model's zero-shot accuracy survives low-resolution inputs, on a training source's validation split.

    python benchmarks/resolution_probe.py --model outputs/reference-zeroshot/final \\
        --model outputs/general/final --sizes 64,32,16

Each model classifies the same seeded ``--limit`` Tiny-ImageNet validation images (WordNet names,
OpenAI's 18 CIFAR prompts) after every image is first resized to ``S x S`` (bicubic) and then
preprocessed by the model's own transform, as a 32 px CIFAR image is. This is the validation
signal for resolution robustness that does not look at CIFAR-10 test (issue 11): a general student
that loses much more than its teacher at 32 px will lose it on CIFAR-10 too.
The cosine columns compare each model's embeddings with the first model's at the first size (pass
the teacher first, at full size first): how closely a student matches the target it was trained on,
which retrieval needs more than top-1 does.
Prints a Markdown table and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="a model directory (repeatable)")
    p.add_argument("--data", default="../shared/data/tiny-imagenet")
    p.add_argument("--split", default="validation")
    p.add_argument("--classnames", default="../shared/data/tiny-imagenet/words.json")
    p.add_argument("--templates", default="openai_cifar")
    p.add_argument("--sizes", default="64,32", help="comma list of square sides the images are reduced to first")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--out", default="outputs/resolution-probe.json")
    return p.parse_args(argv)


def top1_at(model, entry, size: int) -> tuple[float, torch.Tensor]:
    from PIL import Image

    from clipcore.data import ImageDataset, make_loader
    from distill.evaluate import embed_images, zeroshot_eval

    def shrink(image, _row):
        return image.convert("RGB").resize((size, size), Image.BICUBIC)

    dataset = ImageDataset(entry.ds, {"model": model.image_transform}, entry.columns, name="probe", view=shrink)
    images = embed_images(model, make_loader(dataset, 128), progress=False)
    top1 = float(zeroshot_eval(model, images, entry.classnames, entry.templates)["top1"])
    return top1, torch.as_tensor(images.embeddings)


def main(argv: Sequence[str] | None = None) -> dict:
    from distill.suite import parse_suite, prepare_entry
    from students import load_model

    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    (entry,) = parse_suite([{"name": "probe", "data": args.data, "split": args.split, "task": "zeroshot",
                             "classnames": args.classnames, "templates": args.templates, "limit": args.limit}])
    prepared = prepare_entry(entry)
    results, cosines, first = {}, {}, None
    for name in args.model:
        model = load_model(name)  # once per model, not once per size
        runs = {s: top1_at(model, prepared, s) for s in sizes}
        results[name] = {s: top1 for s, (top1, _) in runs.items()}
        # a student is trained to match the teacher's embedding of the image at full size
        first = runs[sizes[0]][1] if first is None else first
        cosines[name] = {s: F.cosine_similarity(emb, first).mean().item() for s, (_, emb) in runs.items()}
    print("| model | " + " | ".join(f"{s} px | cos {s} px" for s in sizes) + " |\n|---|" + "---|---|" * len(sizes))
    for m, row in results.items():
        print(f"| {m} | " + " | ".join(f"{100 * row[s]:.1f} % | {cosines[m][s]:.3f}" for s in sizes) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"limit": args.limit, "data": args.data, "results": results,
                                          "cosine_to_first_model": cosines}, indent=2))
    return results


if __name__ == "__main__":
    main()
