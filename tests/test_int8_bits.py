"""benchmarks/int8_bits.py --margins: flips by the unquantised margin and the agreement with K-times margins."""

from __future__ import annotations

import numpy as np

from tests.scripts import load_script


def _script():
    return load_script("benchmarks/int8_bits.py")


def test_margin_rows_count_flips_and_scale_the_margins(capsys):
    # five images, two classes; margins 0.01 .. 0.05; a rounding error of -0.03 on the winner of the first two
    clean = np.array([[0.51, 0.50], [0.52, 0.50], [0.53, 0.50], [0.54, 0.50], [0.55, 0.50]])
    rounded = clean + np.array([[-0.03, 0.0], [-0.03, 0.0], [-0.02, 0.0], [0.0, 0.0], [0.0, 0.0]])
    _script().margin_rows(clean, rounded)
    out = capsys.readouterr().out
    assert "8-bit flips: 2 of 5" in out  # the 0.01 and 0.02 margins flip, the 0.03 one holds (0.03 > 0.02)
    assert "| K = 1 | 60.0% |" in out
    assert "| K = 2 | 80.0% |" in out  # error / 2 = 0.015 still beats the 0.01 margin
    assert "| K = 4 | 100.0% |" in out  # 0.0075 < 0.01
    assert out.count("| 1 |") == 5  # one image per quintile


def test_relative_margins_and_the_moved_error_are_free_of_each_models_scale():
    # the "teacher" is the student's cosines scaled by 3 and shifted: the same decisions, the same relative margins,
    # so it keeps exactly the student's agreement under the student's error moved to its scale
    rng = np.random.default_rng(0)
    clean = rng.normal(0.2, 0.05, size=(200, 20))
    rounded = clean + rng.normal(0.0, 0.01, size=clean.shape)
    script = _script()
    teacher = 3 * clean + 0.4
    np.testing.assert_allclose(script.relative_margins(teacher), script.relative_margins(clean))
    student_agreement = float((rounded.argmax(1) == clean.argmax(1)).mean())
    assert 0.5 < student_agreement < 1.0  # the error flips some decisions, not all
    assert script.moved_error_agreement(clean, rounded, teacher) == student_agreement
    # a teacher with twice the student's relative margins on every image flips fewer decisions under that error
    top = clean.argmax(1)
    wider = clean.copy()
    wider[np.arange(len(top)), top] += np.sort(clean, axis=1)[:, -1] - np.sort(clean, axis=1)[:, -2]
    assert (script.relative_margins(wider) > script.relative_margins(clean)).all()
    assert script.moved_error_agreement(clean, rounded, wider) > student_agreement


def test_resample_keeps_or_resizes_the_preprocessed_images():
    script = _script()
    pixels = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    assert script.resample(pixels, None) is pixels
    out = script.resample(pixels, 16)
    assert out.shape == (2, 3, 16, 16) and out.dtype == np.float32
    flat = np.full((1, 3, 8, 8), 0.5, dtype=np.float32)  # a flat image stays flat at any size
    np.testing.assert_allclose(script.resample(flat, 16), 0.5, atol=1e-6)


def test_perturbations_stay_within_their_pixel_levels_and_jpeg_changes_the_image():
    from PIL import Image

    from clipcore.imaging import ImageTransform

    script = _script()
    rng = np.random.default_rng(0)
    decoded = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
    transform = ImageTransform(size=16, crop_size=(16, 16))
    clean = np.stack([transform(im) for im in decoded])
    out = script.perturbations(decoded, transform)
    assert list(out) == ["uniform noise of +-0.5 pixel level", "uniform noise of +-1 pixel level",
                         "re-saved as JPEG, quality 95", "re-saved as JPEG, quality 90"]
    level = (1 / 255) / np.asarray(transform.std, np.float32)[None, :, None, None]
    for k, name in ((0.5, "uniform noise of +-0.5 pixel level"), (1.0, "uniform noise of +-1 pixel level")):
        change = np.abs(out[name] - clean) / level
        assert out[name].shape == clean.shape and change.max() <= k + 1e-4 and change.mean() > k / 4
    for quality in (95, 90):  # noise images lose detail in a JPEG: the re-saved pixels differ, the shape stays
        resaved = out[f"re-saved as JPEG, quality {quality}"]
        assert resaved.shape == clean.shape and np.abs(resaved - clean).max() > 0.01
    assert script.jpeg_resaved(decoded[0], 95).size == (16, 16)


def test_half_rows_leave_each_half_in_float_in_turn_and_restore_every_site():
    class Site:
        in_float = False

    sites = [Site() for _ in range(5)]
    seen = []

    def row(name):
        seen.append((name, [s.in_float for s in sites]))

    _script().half_rows(sites, row)
    assert seen == [("the first 2 sites in float (stem and early blocks)", [True, True, False, False, False]),
                    ("the last 3 sites in float", [False, False, True, True, True])]
    assert not any(s.in_float for s in sites)
