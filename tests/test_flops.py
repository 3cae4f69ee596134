
from clipcore.flops import image_gflops, image_parameters


def test_image_flops_and_parameters_of_tiny_clip(tiny_clip):
    vision = tiny_clip.model.vision_model
    expected_params = sum(p.numel() for p in vision.parameters()) + tiny_clip.model.visual_projection.weight.numel()
    assert image_parameters(tiny_clip) == expected_params
    # patch embedding alone: 2 * (3*8*8) * 32 * 16 patches; the whole tower costs more
    patch = 2 * 3 * 8 * 8 * 32 * 16 / 1e9
    g = image_gflops(tiny_clip)
    assert patch < g < 0.01
    tiny_clip.train()
    image_gflops(tiny_clip)
    assert tiny_clip.training
    tiny_clip.eval()


def test_flops_scale_with_resolution(tmp_path):
    from clipcore.loading import load_dual_encoder
    from clipcore.testing import make_tiny_clip

    small = load_dual_encoder(str(make_tiny_clip(tmp_path / "a", image_size=32)))
    big = load_dual_encoder(str(make_tiny_clip(tmp_path / "b", image_size=64)))
    assert image_gflops(big) > 3.5 * image_gflops(small)  # 4x the patches (attention grows faster)


def test_input_side_cost_shows_the_padding_jump(capsys):
    """benchmarks/input_side_cost.py: Lite0's cost jumps between 64 and 68 px (its last feature map goes
    from 2x2 to 3x3 under TF-style "same" padding), far more than the 13 % more pixels."""
    from tests.scripts import load_script

    rows = load_script("benchmarks/input_side_cost.py").main(["--student", "efficientnet-lite0-64", "--sides", "64,68"])
    at64, at68 = (r["gflops"] for r in rows)
    assert 0.06 < at64 < 0.07 and at68 > 1.5 * at64
    assert "| efficientnet-lite0-64 | 68 px |" in capsys.readouterr().out
