"""Do scene photos teach a general student other scene photos? A diagnosis for issue 11's COCO gap.

    python benchmarks/scene_transfer.py --split-only            # writes the two halves (outside the repo)
    python distill/train.py --config configs/general.yaml progress=false optim.max_steps=1500 \\
        eval_every=0 save_every=0 output_dir=outputs/pilot-scenes-1500 \\
        "data.train=[{path: ../shared/data/tiny-imagenet}, {path: ../shared/data/tiny-imagenet-extra}, \\
                     {path: /tmp/scene-transfer/train, repeat: 50}]"
    python benchmarks/scene_transfer.py outputs/pilot-recipe-1500/final outputs/pilot-scenes-1500/final

COCO-mini's rows carry COCO's own `split` column (80 `train`, 79 `val` images). The first call writes
the two halves as parquet under ``--work`` (default /tmp/scene-transfer: never into the repository);
a student then trains with the 80 `train` photos added to the recipe's sources, and the second call
compares students on the 79 held-out `val` photos: mean cosine to the teacher's embedding and
image->text R@5 over their 395 captions (and the same on the 80 seen photos). If 80 scenes raise
the cosine on 79 other scenes where no arrangement of Tiny-ImageNet images did, the gap is the
kind of training images. A diagnosis only: the student trained on COCO photos is never a result
of the suite, whose COCO-mini entry holds these images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets

from benchmarks.embedding_gap import embed, r_at_5, row_cos
from distill.suite import parse_suite, prepare_entry
from students import load_model

COCO = "../shared/data/coco-mini"
TEACHER = "outputs/reference-zeroshot/final"


def split_coco(work: Path) -> dict[str, Path]:
    """COCO-mini's `train` and `val` rows as two parquet datasets under ``work`` (written once)."""
    out = {name: work / name for name in ("train", "val")}
    if all((p / "data.parquet").exists() for p in out.values()):
        return out
    if not Path(COCO).is_dir():
        raise SystemExit(f"{COCO} is absent: this diagnosis needs ../shared/data/coco-mini")
    ds = datasets.load_dataset("parquet", data_dir=COCO, split="train")
    for name, path in out.items():
        path.mkdir(parents=True, exist_ok=True)
        half = ds.filter(lambda split, n=name: split == n, input_columns="split")
        half.to_parquet(str(path / "data.parquet"))
        print(f"{path}: {len(half)} COCO-mini images of COCO's {name} split", flush=True)
    return out


def entry(name: str, path: Path) -> dict:
    return {"name": name, "data": str(path), "split": "train", "task": "retrieval", "metric": "image_to_text_R@5"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("students", nargs="*", help="saved students to compare on the held-out photos")
    parser.add_argument("--work", default="/tmp/scene-transfer", help="where the two halves are written")
    parser.add_argument("--split-only", action="store_true", help="write the halves and stop")
    args = parser.parse_args(argv)
    halves = split_coco(Path(args.work))
    if args.split_only:
        return
    teacher = load_model(TEACHER).eval()
    for name in ("val", "train"):
        prepared = prepare_entry(parse_suite([entry(f"coco-{name}", halves[name])])[0])
        target = embed(teacher, prepared)
        print(f"teacher, COCO-mini {name} ({len(prepared.ds)} images, {len(prepared.texts)} captions): "
              f"R@5 {r_at_5(teacher, prepared, target):.3f}", flush=True)
        for path in args.students:
            student = load_model(path).eval()
            images = embed(student, prepared)
            cos = row_cos(images.embeddings, target.embeddings).mean().item()
            print(f"{path}, COCO-mini {name}: cosine to the teacher {cos:.3f}, R@5 "
                  f"{r_at_5(student, prepared, images):.3f}", flush=True)


if __name__ == "__main__":
    main()
