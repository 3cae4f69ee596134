"""Students: registry, builder, inheritance from a teacher, save/load round trips. CPU, tiny sizes."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from clipcore import compat
from students import (
    ClipStudentConfig,
    FrozenTextStudent,
    ImageStudentConfig,
    TextSpec,
    TowerConfig,
    UnknownStudentError,
    build_student,
    get_student_config,
    inherit_from_teacher,
    list_students,
    load_student,
    pick_layers,
    register_student,
    save_student,
)

TEXTS = ["a photo of a cat", "dog"]


def _images(n: int = 2, side: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _assert_unit_rows(emb: torch.Tensor, n: int, dim: int) -> None:
    assert emb.shape == (n, dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(n))


@pytest.fixture(scope="module")
def deep_teacher(tmp_path_factory):
    """A tiny CLIP teacher with 4 layers per tower (same widths as the test-tiny student)."""
    from clipcore.loading import load_teacher
    from clipcore.testing import make_tiny_clip

    return load_teacher(str(make_tiny_clip(tmp_path_factory.mktemp("deep"), seed=1, layers=4)))


# --- registry -------------------------------------------------------------------------------


def test_registry_has_both_kinds():
    assert {"vit-tiny-16", "vit-small-32", "vit-tiny-cifar", "test-tiny"} <= set(list_students("clip"))
    assert {"mobilenetv2-1.0", "resnet-18", "convnextv2-atto", "convnextv2-femto", "vit-tiny-16-vision"} <= set(
        list_students("frozen_text")
    )
    atto = get_student_config("convnextv2-atto")
    assert atto.backbone_config == dict(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320])


def test_unknown_name_lists_valid_names(tiny_clip):
    with pytest.raises(UnknownStudentError, match="registered students: .*resnet-18.*vit-tiny-16"):
        get_student_config("vit-huge-99")
    with pytest.raises(UnknownStudentError, match="vit-tiny-cifar"):
        build_student("vit-huge-99", teacher=tiny_clip)


def test_register_rejects_duplicate_names():
    with pytest.raises(ValueError, match="already registered"):
        register_student(get_student_config("test-tiny"))


# --- every registered student builds ---------------------------------------------------------


@pytest.mark.parametrize("name", list_students("clip") + list_students("frozen_text"))  # text: test_text_student.py
def test_every_student_builds_and_embeds(name, tiny_clip):
    # 32 px keeps every entry fast; the native sizes are checked on the meta device below
    student = build_student(name, teacher=tiny_clip, image_size=32).eval()
    with torch.no_grad():
        _assert_unit_rows(student.encode_image(_images()), 2, tiny_clip.embed_dim)
        text = student.encode_text(TEXTS)
    _assert_unit_rows(text, 2, tiny_clip.embed_dim)
    assert student.image_transform.output_size == (32, 32)
    assert student.image_transform.mean == tiny_clip.image_transform.mean
    if isinstance(student, FrozenTextStudent):
        torch.testing.assert_close(text, tiny_clip.encode_text(TEXTS), rtol=0, atol=0)
        assert not any(p is q for p in student.parameters() for q in tiny_clip.parameters())


@pytest.mark.parametrize(
    "name, millions",
    [("vit-tiny-16", (8, 25)), ("vit-small-32", (20, 45)), ("vit-tiny-cifar", (8, 25)),
     ("mobilenetv2-1.0", (2, 3)), ("resnet-18", (11, 12)), ("convnextv2-atto", (3, 4)),
     ("convnextv2-femto", (4.5, 5.5)), ("vit-tiny-16-vision", (2.5, 3.5))],
)
def test_native_size_configs(name, millions):
    """Parameter counts at native size and an OpenAI-sized vocabulary, without allocating."""
    from transformers import CLIPConfig, CLIPModel

    from students.clip_student import clip_config

    cfg = get_student_config(name)
    if isinstance(cfg, ClipStudentConfig):
        text = TextSpec(vocab_size=49408, eos_token_id=49407, pad_token_id=49407, bos_token_id=49406, max_length=77)
        config = clip_config(cfg, text, embed_dim=512, image_size=cfg.image_size)
        assert isinstance(config, CLIPConfig) and config.text_config.eos_token_id == 49407
        with torch.device("meta"):
            model = CLIPModel(config)
        assert model.vision_model.embeddings.num_patches == (cfg.image_size // cfg.patch_size) ** 2
    else:
        # image towers are small enough to allocate; transformers 4.45 cannot build ConvNeXt V2 on "meta"
        # (its drop-path schedule calls .tolist() on a meta tensor)
        model = build_student(cfg, embed_dim=512)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions[0] <= count <= millions[1], f"{name}: {count:.2f}M parameters"


# --- CLIP students ---------------------------------------------------------------------------


def test_clip_student_round_trips_through_from_pretrained(tiny_clip, tmp_path):
    from transformers import CLIPModel

    from clipcore.loading import load_image_transform

    student = build_student("test-tiny", teacher=tiny_clip).eval()
    save_student(student, tmp_path)
    plain = CLIPModel.from_pretrained(tmp_path).eval()
    loaded = load_student(tmp_path)
    tokens = student.tokenize(TEXTS)
    with torch.no_grad():
        img, txt = student.encode_image(_images()), student.encode_tokens(**tokens)
        torch.testing.assert_close(compat.image_features(plain, _images()), student.image_features(_images()),
                                   rtol=0, atol=0)
        torch.testing.assert_close(compat.text_features(plain, **tokens), student.text_features(**tokens), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_image(_images()), img, rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(TEXTS), txt, rtol=0, atol=0)
    assert load_image_transform(str(tmp_path)) == student.image_transform == loaded.image_transform
    assert json.loads((tmp_path / "student.json").read_text())["kind"] == "clip"


def test_clip_student_own_tokenizer_and_image_size(tiny_clip, tmp_path):
    from clipcore.testing import write_byte_tokenizer

    tokenizer = write_byte_tokenizer(tmp_path / "tok16", max_length=16)
    student = build_student("test-tiny", teacher=tiny_clip, tokenizer=tokenizer, image_size=16).eval()
    text_cfg = student.model.config.text_config
    assert (text_cfg.max_position_embeddings, text_cfg.eos_token_id) == (16, tokenizer.eos_token_id)
    assert student.image_transform.output_size == (16, 16) != tiny_clip.image_transform.output_size
    long_caption = "a caption much longer than sixteen byte tokens"
    with torch.no_grad():
        _assert_unit_rows(student.encode_image(_images(side=16)), 2, tiny_clip.embed_dim)
        batch = student.encode_text(["cat", long_caption])
        alone = student.encode_text(["cat"])
    assert student.tokenize([long_caption])["input_ids"].shape[1] == 16  # truncated to the student's context
    # pooling must sit on the end-of-text token, not on padding, so batching does not change "cat"
    torch.testing.assert_close(batch[:1], alone)


def test_clip_student_with_vocabulary_of_another_size(tiny_clip):
    from transformers import AutoTokenizer

    from tests.conftest import require_shared

    tokenizer = AutoTokenizer.from_pretrained(str(require_shared("clip-vit-base-patch32")))
    student = build_student("test-tiny", teacher=tiny_clip, tokenizer=tokenizer)
    assert student.model.config.text_config.vocab_size == len(tokenizer) != len(tiny_clip.tokenizer)
    with torch.no_grad():
        _assert_unit_rows(student.encode_text(TEXTS), 2, tiny_clip.embed_dim)


class _StubTokenizer:
    def __init__(self, eos, ids, sep=None):
        self.eos_token_id, self._ids, self.sep_token_id = eos, ids, sep

    def __call__(self, text):
        return {"input_ids": self._ids}


@pytest.mark.parametrize(
    "tokenizer, message",
    [(_StubTokenizer(None, [5]), "no eos"), (_StubTokenizer(2, [5, 2]), "eos_token_id 2"),
     (_StubTokenizer(9, [5, 6]), "does not end sequences")],
)
def test_text_spec_rejects_tokenizers_clip_cannot_pool(tokenizer, message):
    with pytest.raises(ValueError, match=message):
        TextSpec.from_tokenizer(tokenizer)


def test_text_spec_pools_at_sep_for_bert_style_tokenizers():
    # e.g. a MiniLM teacher's tokenizer: no eos token, every sequence ends with [SEP]
    spec = TextSpec.from_tokenizer(_BertLike())
    assert spec.eos_token_id == 102 and spec.pad_token_id == 0


class _BertLike(_StubTokenizer):
    def __init__(self):
        super().__init__(None, [101, 1037, 102], sep=102)
        self.pad_token_id, self.bos_token_id, self.model_max_length = 0, None, 512

    def __len__(self):
        return 30522


def test_clip_student_needs_a_tokenizer_and_divisible_size():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_student("test-tiny", embed_dim=8)
    with pytest.raises(ValueError, match="embed_dim"):
        build_student("test-tiny")


def test_clip_student_rejects_size_not_multiple_of_patch(tiny_clip):
    with pytest.raises(ValueError, match="not a multiple of patch size 8"):
        build_student("test-tiny", teacher=tiny_clip, image_size=20)


def test_init_from_checkpoint(tiny_clip, tiny_clip_dir):
    student = build_student("test-tiny", teacher=tiny_clip, init=tiny_clip_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(student.encode_image(_images()), tiny_clip.encode_image(_images()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="lacks .* weights"):
        build_student("test-tiny-resnet", teacher=tiny_clip, init=tiny_clip_dir)


def test_cnn_init_from_backbone_checkpoint(tiny_clip, tmp_path):
    from transformers import ResNetModel

    from students.backbones import backbone_config

    cfg = get_student_config("test-tiny-resnet")
    pretrained = ResNetModel(backbone_config("resnet", cfg.backbone_config, embed_dim=16, image_size=32))
    pretrained.save_pretrained(tmp_path)
    student = build_student(cfg, teacher=tiny_clip, init=tmp_path)
    for key, value in pretrained.state_dict().items():
        torch.testing.assert_close(student.image_tower.backbone.state_dict()[key], value, rtol=0, atol=0)


# --- inheritance from the teacher ------------------------------------------------------------


def test_pick_layers_ends_at_the_last_teacher_layer():
    assert pick_layers(4, 2) == [1, 3]
    assert pick_layers(12, 6) == [1, 3, 5, 7, 9, 11]
    assert pick_layers(12, 5) == [3, 5, 7, 9, 11]
    with pytest.raises(ValueError, match="more than the teacher"):
        pick_layers(2, 4)


def _assert_same(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    src_state = src.state_dict()
    for key, value in dst.state_dict().items():
        torch.testing.assert_close(value, src_state[key], rtol=0, atol=0, msg=key)


def test_inherit_copies_every_kth_layer(deep_teacher):
    student = build_student("test-tiny", teacher=deep_teacher)
    report = inherit_from_teacher(student, deep_teacher)
    s, t = student.model, deep_teacher.model
    assert report.layer_map == {"vision_model": [1, 3], "text_model": [1, 3]}
    for tower in ("vision_model", "text_model"):
        for i, j in enumerate([1, 3]):
            _assert_same(getattr(s, tower).encoder.layers[i], getattr(t, tower).encoder.layers[j])
        _assert_same(getattr(s, tower).embeddings, getattr(t, tower).embeddings)
    for part in ("vision_model.pre_layrnorm", "vision_model.post_layernorm", "text_model.final_layer_norm",
                 "visual_projection", "text_projection"):
        _assert_same(s.get_submodule(part), t.get_submodule(part))
    assert s.logit_scale.item() == t.logit_scale.item()
    assert report.num_copied == len(s.state_dict()) and not report.skipped and not report.adapted


def test_inherit_at_another_image_size_and_tokenizer(deep_teacher, tmp_path):
    from clipcore.testing import write_byte_tokenizer

    tokenizer = write_byte_tokenizer(tmp_path, max_length=16)
    tokenizer.add_tokens(["<extra>"])  # another vocabulary: token embeddings must not be copied
    student = build_student("test-tiny", teacher=deep_teacher, tokenizer=tokenizer, image_size=16)
    report = inherit_from_teacher(student, deep_teacher)
    assert set(report.adapted) == {"vision_model.embeddings.position_embedding.weight",
                                   "text_model.embeddings.position_embedding.weight"}
    assert list(report.skipped) == ["text_model.embeddings.token_embedding.weight"]
    pos = student.model.text_model.embeddings.position_embedding.weight
    torch.testing.assert_close(pos, deep_teacher.model.text_model.embeddings.position_embedding.weight[:16])
    with torch.no_grad():
        _assert_unit_rows(student.encode_image(_images(side=16)), 2, deep_teacher.embed_dim)


def test_build_with_teacher_init_and_vision_only_student(deep_teacher):
    student = build_student("test-tiny-vision", teacher=deep_teacher, init="teacher")
    backbone = student.image_tower.backbone
    _assert_same(backbone.vision_model.encoder.layers[1], deep_teacher.model.vision_model.encoder.layers[3])
    _assert_same(backbone.visual_projection, deep_teacher.model.visual_projection)
    assert student.log_logit_scale.item() == deep_teacher.log_logit_scale.item()


def test_inherit_mismatched_widths_names_the_dims(tiny_clip):
    with pytest.raises(ValueError, match=r"vision_model.hidden_size: student 192 != teacher 32.*patch_size"):
        build_student("vit-tiny-cifar", teacher=tiny_clip, init="teacher")
    narrow = ClipStudentConfig("narrow", 32, 8, vision=TowerConfig(32, 2, 4, 37), text=TowerConfig(16, 2, 4))
    with pytest.raises(ValueError, match=r"text_model.hidden_size: student 16 != teacher 32") as err:
        build_student(narrow, teacher=tiny_clip, init="teacher")
    assert "vision_model" not in str(err.value)  # only the towers that differ are named
    with pytest.raises(ValueError, match=r"visual_projection \(out, in\): student \(8, 32\) != teacher \(16, 32\)"):
        build_student("test-tiny", teacher=tiny_clip, embed_dim=8, init="teacher")


def test_teacher_init_needs_clip_vit_on_both_sides(tiny_clip):
    with pytest.raises(TypeError, match="no teacher counterpart"):
        build_student("test-tiny-resnet", teacher=tiny_clip, init="teacher")
    student = build_student("test-tiny-resnet", teacher=tiny_clip)
    with pytest.raises(TypeError, match="CLIP ViT teacher"):
        inherit_from_teacher(build_student("test-tiny", teacher=tiny_clip), student)
    with pytest.raises(ValueError, match="needs teacher="):
        build_student("test-tiny", embed_dim=16, tokenizer=tiny_clip.tokenizer, init="teacher")


# --- image-only students ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["test-tiny-resnet", "mobilenetv2-1.0", "convnextv2-atto", "test-tiny-vision"])
def test_image_only_student_round_trip(name, tiny_clip, tiny_clip_dir, tmp_path):
    from safetensors import safe_open

    student = build_student(name, teacher=tiny_clip, image_size=32)
    with torch.no_grad():
        student.encode_image(_images(4, seed=1))  # a train-mode pass moves BatchNorm statistics off their init
    student.eval()
    save_student(student, tmp_path)
    meta = json.loads((tmp_path / "student.json").read_text())
    assert meta["kind"] == "frozen_text" and meta["embed_dim"] == tiny_clip.embed_dim
    assert meta["teacher"]["name_or_path"] == str(tiny_clip_dir.resolve())
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("image_tower.") or k == "log_scale" for k in keys)

    # the recorded teacher is reloaded from disk once; the other cases pass it in
    loaded = load_student(tmp_path) if name == "test-tiny-resnet" else load_student(tmp_path, teacher=tiny_clip)
    assert isinstance(loaded, FrozenTextStudent) and loaded.image_transform == student.image_transform
    assert loaded.teacher.fingerprint() == tiny_clip.fingerprint()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(_images()), student.encode_image(_images()), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(TEXTS), tiny_clip.encode_text(TEXTS), rtol=0, atol=0)


def test_image_only_student_keeps_the_teacher_out_of_its_module(tiny_clip):
    student = build_student("test-tiny-resnet", teacher=tiny_clip)
    assert student.teacher is tiny_clip
    assert all(k.startswith("image_tower.") or k == "log_scale" for k in student.state_dict())
    student.train()
    assert not tiny_clip.training  # train() must not wake the frozen teacher
    # every image-tower parameter learns from the image side; the student's own temperature (a
    # parameter, as a CLIP student's) from the logits
    student.encode_image(_images()).sum().backward()
    assert all(p.grad is not None for n, p in student.named_parameters() if n != "log_scale")
    student.logit_scale.backward()
    assert student.log_scale.grad is not None
    ema = copy.deepcopy(student)  # e.g. an EMA copy: new student weights, the same teacher
    assert ema.teacher is tiny_clip and ema.image_tower.head.weight is not student.image_tower.head.weight
    torch.testing.assert_close(ema.image_tower.head.weight, student.image_tower.head.weight)
    fingerprint = student.fingerprint()
    student.attach_teacher(build_student("test-tiny", teacher=tiny_clip))  # another text side, same dim
    assert student.fingerprint() != fingerprint


def test_image_only_student_errors(tiny_clip, tiny_clip_dir, deep_teacher, tmp_path):
    with pytest.raises(ValueError, match="image-only"):
        build_student("test-tiny-resnet", teacher=tiny_clip, tokenizer=tiny_clip.tokenizer)
    with pytest.raises(ValueError, match="must share the teacher's text embedding space"):
        build_student("test-tiny-resnet", teacher=tiny_clip, embed_dim=8)
    orphan = build_student("test-tiny-resnet", embed_dim=16)
    with pytest.raises(RuntimeError, match="without a teacher"):
        orphan.encode_text(TEXTS)
    save_student(build_student("test-tiny-resnet", teacher=tiny_clip), tmp_path / "s")
    with pytest.warns(UserWarning, match="differs from the one the student was saved with"):
        load_student(tmp_path / "s", teacher=deep_teacher)
    with pytest.raises(FileNotFoundError, match="load_dual_encoder"):
        load_student(tiny_clip_dir)


def test_unknown_backbone_is_an_error(tiny_clip):
    with pytest.raises(ValueError, match="supported: clip_vision, convnextv2, efficientnet_lite, mobilenet_v2, resnet"):
        build_student(ImageStudentConfig("x", backbone="efficientnet"), teacher=tiny_clip)
