"""How many activation bits the ≥ 99 % int8 agreement goal needs: the student fake-quantised in torch.

    python benchmarks/int8_bits.py --student outputs/general-qat/final --limit 1000

The student's image tower is fake-quantised where static QDQ int8 rounds it (``students.qat.prepare_qat``:
int8 weights per output channel, one activation range per tensor, before and after every conv/linear;
the ranges a QAT student trained under, else set once from 128 seeded Tiny-ImageNet training images) and
compared with the same student unquantised on ``--limit`` seeded Tiny-ImageNet validation images: top-1
agreement of 200-way zero-shot (the student's own text side, one prompt per first WordNet name) and the
embedding cosine. No ONNX: torch's simulation, which a QAT student's int8 graph follows to within a few
tenths of a point of agreement (docs/edge-bundle.md). Rows:

    weights only        int8 weights, activations in float
    activations N bits  int8 weights, every activation with 2^N levels over its range (8: what ships)
    site in float       8 bits everywhere but one site: the ``--top`` sites whose float restores most
    top-K in float      8 bits everywhere but the K sites of the rows above together
    per-channel ranges  8 (7) bits, but one range per channel of every activation, each the exact
                        min/max of the very images measured (an oracle: nothing is clipped): more
                        than any equalising of channel ranges (cross-layer equalisation,
                        SmoothQuant-style rescaling) could give one range per tensor

``--margins`` adds two tables from the 8-bit run: the flips by the unquantised student's top-1 margin (the
cosine gap between its two best classes), and the agreement a student with K times larger margins would keep
under the same rounding error (argmax of the unquantised cosines plus the 8-bit run's cosine error / K: the
decisions of logits scaled by K around the same error). ``--teacher PATH`` (with ``--margins``) asks whether a student
as decisive as its teacher would do better: the teacher's margins on the same images and head prompts, each over the
spread of that image's class cosines, against the student's, and the teacher's top-1 agreement under the student's
8-bit error rescaled to the teacher's spread (image by image, class by class). ``--image-size N`` resamples every
preprocessed image (validation and calibration) to N x N, bicubic, before the runs: does a larger input, whose last
feature map averages more positions into the embedding, round less? (Only the input changes, not the student.)
``--halves`` adds two rows: the first half of the activation sites (in network order: the stem and the early blocks)
in float, the rest at 8 bits, and the other way round.
``--perturb`` puts the 8-bit flips beside flips no quantisation makes: the unquantised student's (and with
``--teacher`` the teacher's) top-1 agreement with itself when each image gets uniform noise of +-0.5 or +-1 of
an 8-bit pixel level, or is re-saved as a JPEG (quality 95, 90) before preprocessing.

Needs ``../shared/data/tiny-imagenet``. Writes nothing.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # int8_placement, beside this script

from int8_placement import images, tiny_names  # noqa: E402

import students.qat as qat  # noqa: E402
from PIL import Image  # noqa: E402

from clipcore.imaging import ImageTransform, decode_image  # noqa: E402
from clipcore.loading import load_teacher  # noqa: E402
from students import load_model  # noqa: E402
from students.qat import ACT_QMIN, ActivationQuant, load_ranges, prepare_qat  # noqa: E402

_quantise = ActivationQuant.__call__
PER_CHANNEL = {"on": False, "calibrating": False}  # the per-channel rows: one range per channel (axis 1)


def _call(self: ActivationQuant, x: torch.Tensor) -> torch.Tensor:
    """ActivationQuant's rounding, skipped for a site marked ``in_float`` or when every site is (``bits`` 0)."""
    if getattr(self, "in_float", False) or qat.ACT_QMAX == 0:
        return x
    return _per_channel(self, x) if PER_CHANNEL["on"] else _quantise(self, x)


def _per_channel(self: ActivationQuant, x: torch.Tensor) -> torch.Tensor:
    """uint8 rounding with one range per channel, set by the calibration pass (each range holding 0)."""
    dims = [d for d in range(x.dim()) if d != 1]
    if PER_CHANNEL["calibrating"]:
        self.ch_low = x.amin(dim=dims).clamp_max(0.0)
        self.ch_high = x.amax(dim=dims).clamp_min(0.0)
        return x
    scale = ((self.ch_high - self.ch_low) / (qat.ACT_QMAX - ACT_QMIN)).clamp_min(1e-8).float()
    zero = torch.round(ACT_QMIN - self.ch_low / scale).clamp(ACT_QMIN, qat.ACT_QMAX).to(torch.int32)
    return torch.fake_quantize_per_channel_affine(x, scale, zero, 1, ACT_QMIN, qat.ACT_QMAX)


def head_prompts() -> list[str]:
    """One prompt per Tiny-ImageNet class (its first WordNet name): the 200-way zero-shot head of every row."""
    return [f"a photo of a {n.split(',')[0]}." for n in tiny_names()]


def jpeg_resaved(image: Image.Image, quality: int) -> Image.Image:
    """``image`` saved as a JPEG of ``quality`` and read back, as a photo re-saved by any editor would be."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def perturbations(decoded: list[Image.Image], transform: ImageTransform, seed: int = 0) -> dict[str, np.ndarray]:
    """Preprocessed pixels of ``decoded`` under changes no quantisation makes: uniform noise of +-0.5 / +-1 of an
    8-bit pixel level (in the transform's normalised units), and the images re-saved as JPEGs (quality 95, 90)."""
    clean = np.stack([transform(im) for im in decoded]).astype(np.float32)
    level = np.float32(transform.rescale_factor) / np.asarray(transform.std, np.float32)[None, :, None, None]
    rng = np.random.default_rng(seed)
    out = {f"uniform noise of +-{k:g} pixel level": clean + rng.uniform(-k, k, clean.shape).astype(np.float32) * level
           for k in (0.5, 1.0)}
    for quality in (95, 90):
        out[f"re-saved as JPEG, quality {quality}"] = np.stack([transform(jpeg_resaved(im, quality)) for im in decoded])
    return out


def perturbation_rows(name: str, model, decoded: list[Image.Image]) -> None:
    """``model``'s top-1 agreement with itself (200-way zero-shot, unquantised) under each of :func:`perturbations`."""
    with torch.no_grad():
        head = model.encode_text(head_prompts()).float().numpy()
    clean = (embed(model, np.stack([model.image_transform(im) for im in decoded]).astype(np.float32)) @ head.T).argmax(1)
    for what, pixels in perturbations(decoded, model.image_transform).items():
        agree = float(((embed(model, pixels.astype(np.float32)) @ head.T).argmax(1) == clean).mean())
        print(f"| {name} | {what} | {agree:.1%} |", flush=True)


def resample(pixels: np.ndarray, size: int | None) -> np.ndarray:
    """``(N, C, H, W)`` preprocessed images resampled to ``size x size`` (bicubic; ``None``: unchanged)."""
    if size is None:
        return pixels
    out = torch.nn.functional.interpolate(torch.from_numpy(pixels), size=(size, size), mode="bicubic", align_corners=False)
    return out.numpy()


def embed(student, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = torch.cat([student.image_features(torch.from_numpy(pixels[i:i + 125])) for i in range(0, len(pixels), 125)])
    out = out.float().numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--bits", default="8,9,10,12", help="activation bit widths to simulate")
    p.add_argument("--top", type=int, default=5,
                   help="sites kept in float one at a time, reported best first (0: skip the site rows, 100 passes)")
    p.add_argument("--margins", action="store_true",
                   help="add the flips by margin and the agreement with K times larger margins (8 bits)")
    p.add_argument("--teacher", help="with --margins: compare the teacher's margins and its agreement under the "
                                     "student's relative 8-bit error; with --perturb: its rows too")
    p.add_argument("--perturb", action="store_true",
                   help="first: the unquantised top-1 agreement under pixel noise and JPEG re-saving")
    p.add_argument("--halves", action="store_true",
                   help="add the rows with the first / the second half of the sites (network order) in float")
    p.add_argument("--image-size", type=int, help="resample every preprocessed image to this side first (bicubic)")
    args = p.parse_args()
    torch.set_num_threads(2)
    student = load_model(args.student).eval()
    transform = student.image_transform
    validation = images("validation", args.limit, 1)  # the teacher rows (--teacher) embed the same images
    pixels = resample(np.stack([transform(decode_image(im, "validation image")) for im in validation]).astype(np.float32),
                      args.image_size)
    cal = torch.from_numpy(resample(np.stack([transform(decode_image(im, "calibration image"))
                                              for im in images("train", 128, 0)]).astype(np.float32), args.image_size))
    with torch.no_grad():
        head = student.encode_text(head_prompts()).float().numpy()
    ref = embed(student, pixels)
    if args.perturb:
        decoded = [decode_image(im, "validation image") for im in validation]
        print("| model (unquantised) | each image | top-1 agreement with the unchanged image |\n|---|---|---|")
        perturbation_rows("student", student, decoded)
        if args.teacher:
            perturbation_rows("teacher", load_teacher(args.teacher), decoded)
    tower = student.image_tower
    handle = prepare_qat(tower, lambda: tower(cal), momentum=1.0)
    saved = load_ranges(args.student)
    if saved:
        handle.set_ranges(saved, f"{args.student}/{qat.QAT_RANGES_FILE}")
    source = "the QAT student's own" if saved else "128 calibration images"
    print(f"{handle.summary()}; ranges: {source}")
    ActivationQuant.__call__ = _call

    def row(name: str, bits: int = 8) -> float:
        qat.ACT_QMAX = 2 ** bits - 1 if bits else 0
        emb = embed(student, pixels)
        agree = float(((emb @ head.T).argmax(1) == (ref @ head.T).argmax(1)).mean())
        cos = (emb * ref).sum(1)
        print(f"| {name} | {agree:.1%} | {cos.mean():.5f} / {cos.min():.4f} |", flush=True)
        return agree

    print("| torch simulation | top-1 agreement with the unquantised student | cosine mean / min |\n|---|---|---|")
    row("weights only", bits=0)
    for bits in (int(b) for b in args.bits.split(",")):
        row(f"activations {bits} bits", bits)
    if args.margins:
        qat.ACT_QMAX = 255
        rounded = embed(student, pixels) @ head.T  # the 8-bit run's cosines, for the tables at the end
    PER_CHANNEL.update(on=True, calibrating=True)
    qat.ACT_QMAX = 255
    with torch.no_grad():  # the oracle: ranges of the evaluated images themselves, all in one batch
        tower(torch.from_numpy(pixels))
    PER_CHANNEL["calibrating"] = False
    for bits in (8, 7):
        row(f"per-channel ranges, activations {bits} bits", bits)
    PER_CHANNEL["on"] = False
    if args.halves:
        half_rows(handle.observers, row)
    if args.top > 0:
        site_rows(handle, args.top, lambda: embed(student, pixels), ref, row)
    if args.margins:
        margin_rows(ref @ head.T, rounded)
        if args.teacher:
            teacher_rows(args.teacher, validation, ref @ head.T, rounded)


def margin_rows(clean: np.ndarray, rounded: np.ndarray) -> None:
    """Flips by the unquantised top-1 margin (quintiles), and agreement with the margins scaled by K."""
    top2 = np.sort(clean, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    flip = rounded.argmax(1) != clean.argmax(1)
    error = rounded - clean
    print(f"\n8-bit flips: {int(flip.sum())} of {len(flip)}; median |cosine error| of a class "
          f"{float(np.median(np.abs(error))):.5f}\n")
    print("| unquantised top-1 margin (cosine gap), quintile | images | flipped |\n|---|---|---|")
    edges = np.quantile(margin, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (margin >= lo) & (margin <= hi)
        print(f"| {lo:.4f} - {hi:.4f} | {int(inside.sum())} | {flip[inside].mean():.1%} |")
    print("\n| margins x K, same 8-bit error | top-1 agreement |\n|---|---|")
    for k in (1, 1.5, 2, 3, 4, 6):
        agree = float(((clean + error / k).argmax(1) == clean.argmax(1)).mean())
        print(f"| K = {k:g} | {agree:.1%} |")


def teacher_rows(teacher_path: str, validation: list, clean: np.ndarray, rounded: np.ndarray) -> None:
    """The teacher's margins against the student's and its agreement under the student's relative 8-bit error
    (``relative_margins``, ``moved_error_agreement``) on the same images and head prompts."""
    teacher = load_teacher(teacher_path)
    pixels = np.stack([teacher.image_transform(decode_image(im, "validation image"))
                       for im in validation]).astype(np.float32)
    with torch.no_grad():
        head = teacher.encode_text(head_prompts()).float().numpy()
    t_clean = embed(teacher, pixels) @ head.T
    print("\n| top-1 margin / spread of the image's class cosines | p10 | p20 | median | mean |\n|---|---|---|---|---|")
    for name, m in (("student", relative_margins(clean)), ("teacher", relative_margins(t_clean))):
        print(f"| {name} | {np.quantile(m, 0.1):.3f} | {np.quantile(m, 0.2):.3f} | {np.median(m):.3f} | {m.mean():.3f} |")
    print(f"\nthe teacher's top-1 under the student's relative 8-bit error: "
          f"{moved_error_agreement(clean, rounded, t_clean):.1%} agreement (the student's own: "
          f"{float((rounded.argmax(1) == clean.argmax(1)).mean()):.1%}); teacher and unquantised student agree on "
          f"{float((t_clean.argmax(1) == clean.argmax(1)).mean()):.1%}")


def relative_margins(cos: np.ndarray) -> np.ndarray:
    """Each image's top-1 margin (cosine gap to its second class) over the spread (std) of its class cosines: top-1
    decisions do not change when an image's cosines are shifted or scaled, so this compares models of any scale."""
    top2 = np.sort(cos, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) / cos.std(1)


def moved_error_agreement(clean: np.ndarray, rounded: np.ndarray, other: np.ndarray) -> float:
    """Top-1 agreement of ``other``'s cosines (another model, the same images and classes) under the student's
    rounding error, image by image and class by class, rescaled from the student's spread to ``other``'s."""
    error = (rounded - clean) / clean.std(1, keepdims=True) * other.std(1, keepdims=True)
    return float(((other + error).argmax(1) == other.argmax(1)).mean())


def half_rows(observers: list, row) -> None:
    """8 bits everywhere but the first (then the second) half of the sites, in the order the network runs them."""
    half = len(observers) // 2
    for name, in_float in ((f"the first {half} sites in float (stem and early blocks)", lambda j: j < half),
                           (f"the last {len(observers) - half} sites in float", lambda j: j >= half)):
        for j, observer in enumerate(observers):
            observer.in_float = in_float(j)
        row(name)
    for observer in observers:
        observer.in_float = False


def site_rows(handle, top: int, run, ref: np.ndarray, row) -> None:
    """The rows with 8-bit activations everywhere but the ``top`` sites whose float restores most cosine."""
    gains = []
    for observer in handle.observers:
        observer.in_float = True
        qat.ACT_QMAX = 255
        emb = run()
        gains.append((float((emb * ref).sum(1).mean()), observer.key))
        observer.in_float = False
    gains.sort(reverse=True)
    by_key = {o.key: o for o in handle.observers}
    for _, key in gains[:top]:
        by_key[key].in_float = True
        row(f"{key} in float")
        by_key[key].in_float = False
    for k in sorted({1, 3, top, 10, 20}):
        for _, key in gains[:k]:
            by_key[key].in_float = True
        row(f"the {k} sites of most cosine in float ({len(handle.observers)} sites)")
        for observer in handle.observers:
            observer.in_float = False


if __name__ == "__main__":
    main()
