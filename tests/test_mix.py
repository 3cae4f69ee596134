"""Function matching (``data.mix``): mixes of a batch's images with the teacher's targets computed online."""

import numpy as np
import pytest
import torch
from PIL import Image

from clipcore.augment import MixSpec, normalise, preprocess_tensor, unnormalise
from clipcore.distill_loss import LossConfig
from clipcore.imaging import ImageTransform
from distill.config import ConfigError, load_config
from distill.task import DistillTask, TextBank
from students import build_student


def _images(b=8, side=16, seed=0):
    return torch.rand(b, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_mixes_replace_a_share_of_the_batch_by_two_of_its_images():
    images = _images()
    rows, mixes = MixSpec(share=0.5, cutmix=0.5)(images, torch.Generator().manual_seed(1))
    assert rows.shape == (4,) and len(set(rows.tolist())) == 4 and mixes.shape == (4, 3, 16, 16)
    for row, mix in zip(rows.tolist(), mixes):
        # a mix of its row and exactly one other image: mixup (per-pixel convex weights all equal)
        # or CutMix (every pixel from one of the two)
        others = [j for j in range(8) if j != row]
        fits = []
        for j in others:
            a, o = images[row], images[j]
            lam = ((mix - o) * (a - o)).sum() / ((a - o) ** 2).sum()  # least squares
            mixup = torch.allclose(mix, lam * a + (1 - lam) * o, atol=1e-5) and 0 <= lam <= 1
            cut = bool(((mix == a) | (mix == o)).all())
            fits.append(mixup or cut)
        assert sum(fits) == 1


def test_cutmix_and_mixup_each_alone():
    images = _images()
    _, cut = MixSpec(share=1.0, cutmix=1.0)(images, torch.Generator().manual_seed(2))
    rows, mixup = MixSpec(share=1.0, cutmix=0.0)(images, torch.Generator().manual_seed(2))
    pasted = [bool((m != images[r]).any()) for m, r in zip(cut, rows.tolist())]
    assert any(pasted) and all(bool(((m == images[r]) | (m != images[r])).all()) for m, r in zip(cut, rows.tolist()))
    assert not any(bool((m == images[r]).all()) for m, r in zip(mixup, rows.tolist()))  # every pixel blended
    again = MixSpec(share=1.0, cutmix=0.0)(images, torch.Generator().manual_seed(2))
    assert torch.equal(again[1], mixup)  # seeded: a resumed step mixes the same images


def test_cutmix_boxes_take_about_one_minus_lambda_of_the_image():
    lam = torch.full((2000,), 0.75)
    boxes = MixSpec._boxes(lam, torch.full((2000, 2), 0.5), 32, 32)
    assert abs(boxes.float().mean().item() - 0.25) < 0.02  # centred boxes are not clipped


@pytest.mark.parametrize("share, batch, expected", [(0.0, 8, 0), (0.25, 8, 2), (1.0, 8, 8), (0.5, 1, 0)])
def test_mix_count(share, batch, expected):
    rows, mixes = MixSpec(share=share)(_images(batch), torch.Generator().manual_seed(0))
    assert MixSpec(share=share).count(batch) == expected == len(rows) == len(mixes)


@pytest.mark.parametrize("kwargs, match", [({"share": 1.5}, "data.mix.share"), ({"cutmix": -0.1}, "data.mix.cutmix")])
def test_bad_mix_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixSpec(**kwargs)


@pytest.mark.parametrize("transform", [
    ImageTransform(size=40, crop_size=(40, 40), mean=(0.5,) * 3, std=(0.5,) * 3),  # upsample, as 64 -> 160
    ImageTransform(size=12, crop_size=(10, 10)),  # downsample and crop
    ImageTransform(size=(20, 12), crop_size=None, resample="bilinear"),
    ImageTransform(size=16, crop_size=(20, 20)),  # a crop larger than the image pads with black
])
def test_tensor_preprocessing_matches_the_pil_transform(transform):
    rng = np.random.default_rng(0)
    smooth = [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((16, 16), Image.BILINEAR)
              for _ in range(3)]
    expected = torch.stack([torch.from_numpy(transform(im)) for im in smooth])
    pixels = torch.stack([torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy()) for im in smooth]).float() / 255
    got = preprocess_tensor(pixels, transform)
    assert got.shape == expected.shape
    assert (got - expected).abs().mean() < 0.02  # torch's resampling kernels are not PIL's


def test_unnormalise_inverts_normalise():
    t = ImageTransform()
    images = _images()
    torch.testing.assert_close(unnormalise(normalise(images, t), t), images)


def test_the_teacher_embeds_each_mix_online(tiny_clip):
    student = build_student("test-tiny-resnet", teacher=tiny_clip)
    dim = tiny_clip.embed_dim
    bank = TextBank(["a"], None, None, torch.zeros(1, dim), torch.zeros(1, 1, dtype=torch.long), [])
    task = DistillTask(student, tiny_clip, LossConfig(), bank, None, mix=MixSpec(share=0.5))
    side = student.image_transform.output_size[0]
    pixels = normalise(_images(6, side), student.image_transform)
    cached = torch.nn.functional.normalize(torch.randn(6, dim), dim=-1)
    out_pixels, targets = task._mix(pixels, cached, torch.Generator().manual_seed(3))
    changed = [i for i in range(6) if not torch.equal(out_pixels[i], pixels[i])]
    assert len(changed) == 3
    keep = [i for i in range(6) if i not in changed]
    assert torch.equal(targets[keep], cached[keep])  # the other rows keep their cached targets
    mixes = unnormalise(out_pixels[changed], student.image_transform)
    with torch.no_grad():
        online = tiny_clip.encode_image(preprocess_tensor(mixes, tiny_clip.image_transform))
    torch.testing.assert_close(targets[changed], online, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides, match", [
    (["data.mix.share=2"], r"data.mix.share=2"),
    (["data.mix.cutmix=1.5"], r"data.mix.cutmix=1.5"),
    (["data.mix.share=0.5", "loss.clip_weight=1"], r"data.mix.share=0.5 .*loss.clip_weight=0"),
    (["data.mix.blend=1"], r"data.mix.blend"),
])
def test_bad_mix_config_names_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["teacher.name_or_path=t", "data.train=x", *overrides])
