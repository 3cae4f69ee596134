"""What ``data.mix``'s online teacher targets cost and how close they are to the cached ones.

    python benchmarks/mix_targets.py [--images 64]

Embeds the first Tiny-ImageNet validation images with the reference zero-shot teacher twice: through
its PIL transform (as the target cache does) and through ``clipcore.augment.preprocess_tensor`` from
the 64 px pixels (as ``DistillTask._mix`` does for a mix), prints their mean and minimum cosine, then
the median time of a teacher pass over 16 and 32 such images (what a share of 1/8 or 1/4 of a batch
of 128 adds to each step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import datasets
import numpy as np
import torch

from clipcore.augment import preprocess_tensor
from clipcore.loading import load_teacher

TEACHER = "outputs/reference-zeroshot/final"
TINY = "../shared/data/tiny-imagenet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    teacher = load_teacher(TEACHER)
    ds = datasets.load_dataset("parquet", data_dir=TINY, split="validation")
    images = [ds[i]["image"].convert("RGB") for i in range(args.images)]
    pil = torch.stack([torch.from_numpy(teacher.image_transform(im)) for im in images])
    raw = torch.stack([torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy()) for im in images]).float() / 255
    with torch.inference_mode():
        cached = teacher.encode_image(pil)
        online = teacher.encode_image(preprocess_tensor(raw, teacher.image_transform))
        cos = (cached * online).sum(-1)
        print(f"{args.images} images: cosine of online to PIL-transform targets mean {cos.mean():.4f}, "
              f"min {cos.min():.4f}")
        for n in (16, 32):
            batch = preprocess_tensor(raw[:n], teacher.image_transform)
            teacher.encode_image(batch)  # warm-up
            times = []
            for _ in range(5):
                start = time.perf_counter()
                teacher.encode_image(batch)
                times.append(time.perf_counter() - start)
            print(f"teacher pass over {n} images: median {statistics.median(times):.3f} s "
                  f"(min {min(times):.3f}, max {max(times):.3f})")


if __name__ == "__main__":
    main()
