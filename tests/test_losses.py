"""Each loss against a hand-written reference, forward and backward, in one process."""

from __future__ import annotations

import math

import pytest
import torch

from clipcore.distill_loss import DistillLoss, LossConfig, build_losses
from clipcore.losses import (
    LOG_SCALE_MAX,
    CaptionBankKL,
    CaptionContrastiveLoss,
    ClipLoss,
    FeatureDistillLoss,
    ImageAffinityKL,
    InteractiveContrastiveLoss,
    KLDistillLoss,
    clamp_log_scale_,
    kl_distill,
    logit_scale,
    make_feature_projection,
    total_loss,
)

B, DS, DT, C = 5, 6, 8, 4
TEACHER_SCALE = 40.0


# ------------------------------------------------------------------ references: loops and plain math


def ref_normalize(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True))


def ref_scale(log_scale):
    return torch.exp(torch.minimum(log_scale, torch.tensor(math.log(100.0))))


def ref_ce(logits):
    """Cross-entropy with targets on the diagonal, one row at a time."""
    rows = []
    for i in range(logits.shape[0]):
        rows.append(-(logits[i, i] - torch.log(torch.exp(logits[i]).sum())))
    return sum(rows) / len(rows)


def ref_kl(student_logits, teacher_logits, T):
    """sum_j p_t log(p_t / p_s) per row, mean over rows, times T^2."""
    rows = []
    teacher_logits = teacher_logits.detach()
    for i in range(student_logits.shape[0]):
        p_t = torch.exp(teacher_logits[i] / T) / torch.exp(teacher_logits[i] / T).sum()
        p_s = torch.exp(student_logits[i] / T) / torch.exp(student_logits[i] / T).sum()
        rows.append((p_t * (torch.log(p_t) - torch.log(p_s))).sum())
    return sum(rows) / len(rows) * T * T


def ref_clip(image, text, log_scale):
    logits = ref_scale(log_scale) * ref_normalize(image) @ ref_normalize(text).t()
    return (ref_ce(logits) + ref_ce(logits.t())) / 2


def ref_kl_affinity(s_img, s_txt, t_img, t_txt, log_scale, t_scale, T):
    s = ref_scale(log_scale) * ref_normalize(s_img) @ ref_normalize(s_txt).t()
    t = t_scale * ref_normalize(t_img) @ ref_normalize(t_txt).t()
    return (ref_kl(s, t, T) + ref_kl(s.t(), t.t(), T)) / 2


def ref_kl_class(s_img, s_cls, t_img, t_cls, log_scale, t_scale, T):
    s = ref_scale(log_scale) * ref_normalize(s_img) @ ref_normalize(s_cls).t()
    t = t_scale * ref_normalize(t_img) @ ref_normalize(t_cls).t()
    return ref_kl(s, t, T)


def ref_icl(s_img, s_txt, t_img, t_txt, log_scale):
    scale = ref_scale(log_scale)
    i2t = ref_ce(scale * ref_normalize(s_img) @ ref_normalize(t_txt).t())
    if s_txt is None:
        return i2t
    return (i2t + ref_ce(scale * ref_normalize(s_txt) @ ref_normalize(t_img).t())) / 2


def ref_feature(s, t, kind):
    s, t = ref_normalize(s), ref_normalize(t)
    if kind == "cosine":
        return sum(1 - (s[i] * t[i]).sum() for i in range(s.shape[0])) / s.shape[0]
    return ((s - t) ** 2).sum() / s.numel()


# ---------------------------------------------------------------------------------------- fixtures


def make_inputs(seed=0, student_dim=DT, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    return {
        "student_image": leaf(B, student_dim),
        "student_text": leaf(B, student_dim),
        "teacher_image": torch.randn(B, DT, generator=g).to(dtype),
        "teacher_text": torch.randn(B, DT, generator=g).to(dtype),
        "student_class": leaf(C, student_dim),
        "teacher_class": torch.randn(C, DT, generator=g).to(dtype),
        "student_log_scale": torch.tensor(math.log(1 / 0.07)).requires_grad_(),
        "teacher_scale": TEACHER_SCALE,
    }


def assert_same_forward_backward(loss, ref, wrt):
    """loss and ref agree, and so do their gradients with respect to every tensor in ``wrt``."""
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(ref, wrt, retain_graph=True, allow_unused=True)
    for g, w in zip(got, want):
        g = torch.zeros(()) if g is None else g
        w = torch.zeros(()) if w is None else w
        # fp32: five losses summed in another order differ by ~2e-6 in single gradient entries
        torch.testing.assert_close(g, w, rtol=1e-4, atol=5e-6)


def trainable(x):
    return [x[k] for k in ("student_image", "student_text", "student_class", "student_log_scale")]


# --------------------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kl_distill_matches_reference(T):
    g = torch.Generator().manual_seed(1)
    s = (3 * torch.randn(B, 7, generator=g)).requires_grad_()
    t = 3 * torch.randn(B, 7, generator=g)
    assert_same_forward_backward(kl_distill(s, t, T), ref_kl(s, t, T), [s])


def test_kl_temperature_squared_scaling():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(B, 7, generator=g), torch.randn(B, 7, generator=g)
    unscaled = ref_kl(s / 2, t / 2, 1.0)  # KL of the temperature-2 distributions, no T^2
    torch.testing.assert_close(kl_distill(s, t, 2.0), 4 * unscaled)
    assert kl_distill(t, t, 3.0).abs() < 1e-6


def test_kl_teacher_is_detached():
    s, t = torch.randn(B, 7, requires_grad=True), torch.randn(B, 7, requires_grad=True)
    (g_t,) = torch.autograd.grad(kl_distill(s, t, 2.0), [t], allow_unused=True)
    assert g_t is None


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kl_distill_loss_matches_reference(T):
    x = make_inputs()
    out = KLDistillLoss(weight=0.5, temperature=T)(**x)
    assert set(out) == {"kl_class_loss", "kl_affinity_loss"}
    ref_cls = 0.5 * ref_kl_class(
        x["student_image"], x["student_class"], x["teacher_image"], x["teacher_class"],
        x["student_log_scale"], TEACHER_SCALE, T,
    )  # fmt: skip
    ref_aff = 0.5 * ref_kl_affinity(
        x["student_image"], x["student_text"], x["teacher_image"], x["teacher_text"],
        x["student_log_scale"], TEACHER_SCALE, T,
    )  # fmt: skip
    assert_same_forward_backward(out["kl_class_loss"], ref_cls, trainable(x))
    assert_same_forward_backward(out["kl_affinity_loss"], ref_aff, trainable(x))


def test_kl_distill_loss_parts_and_frozen_text_student():
    x = make_inputs()
    assert set(KLDistillLoss(1.0, on_classes=False)(**x)) == {"kl_affinity_loss"}
    no_classes = {k: v for k, v in x.items() if k not in ("student_class", "teacher_class")}
    assert set(KLDistillLoss(1.0, on_affinity=False)(**no_classes)) == set()  # class logits only when given
    # A student that keeps the teacher's text tower: its text side and classes are the teacher's.
    lit = {k: v for k, v in x.items() if k not in ("student_text", "student_class")}
    out = KLDistillLoss(1.0, temperature=2.0)(**lit)
    ref_aff = ref_kl_affinity(
        x["student_image"], x["teacher_text"], x["teacher_image"], x["teacher_text"],
        x["student_log_scale"], TEACHER_SCALE, 2.0,
    )  # fmt: skip
    ref_cls = ref_kl_class(
        x["student_image"], x["teacher_class"], x["teacher_image"], x["teacher_class"],
        x["student_log_scale"], TEACHER_SCALE, 2.0,
    )  # fmt: skip
    assert_same_forward_backward(out["kl_affinity_loss"], ref_aff, [x["student_image"], x["student_log_scale"]])
    assert_same_forward_backward(out["kl_class_loss"], ref_cls, [x["student_image"], x["student_log_scale"]])
    with pytest.raises(ValueError, match="student_class"):
        KLDistillLoss(1.0)(**{k: v for k, v in x.items() if k != "student_class"})


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_caption_bank_kl_matches_reference(T):
    x = make_inputs()
    bank = torch.randn(7, DT, generator=torch.Generator().manual_seed(3))
    out = CaptionBankKL(weight=3.0, temperature=T)(**x, caption_bank=bank)
    ref = 3.0 * ref_kl_class(x["student_image"], bank, x["teacher_image"], bank, x["student_log_scale"],
                             TEACHER_SCALE, T)
    assert set(out) == {"kl_caption_loss"}
    assert_same_forward_backward(out["kl_caption_loss"], ref, [x["student_image"], x["student_log_scale"]])
    # the student in the teacher space: zero when it equals the teacher's image side, whatever the bank
    same = CaptionBankKL(1.0)(**{**x, "student_image": x["teacher_image"],
                                 "student_log_scale": torch.tensor(math.log(TEACHER_SCALE))}, caption_bank=bank)
    torch.testing.assert_close(same["kl_caption_loss"], torch.tensor(0.0), atol=1e-6, rtol=0)
    # through a projection when the student is narrower
    narrow = make_inputs(student_dim=DS)
    proj = torch.randn(B, DT, requires_grad=True)
    got = CaptionBankKL(1.0)(**narrow, caption_bank=bank, student_image_proj=proj)["kl_caption_loss"]
    assert torch.autograd.grad(got, proj)[0].abs().sum() > 0
    assert CaptionBankKL(0.0)(**x, caption_bank=bank) == {}


def ref_caption_contrastive(image, candidates, targets, mask, scale):
    """Cross-entropy of each captioned row over the candidates it may rank, one row at a time."""
    rows = []
    for i in range(image.shape[0]):
        if targets[i] < 0:
            continue
        keep = [j for j in range(candidates.shape[0]) if j == targets[i] or not mask[i, j]]
        logits = scale * torch.stack([ref_normalize(image[i]) @ ref_normalize(candidates[j])
                                                     for j in keep])
        rows.append(-(logits[keep.index(int(targets[i]))] - torch.log(torch.exp(logits).sum())))
    return sum(rows) / len(rows)


def test_caption_contrastive_ranks_each_captioned_row_against_the_rest():
    x = make_inputs()
    g = torch.Generator().manual_seed(5)
    candidates = torch.randn(B + 6, DT, generator=g)
    targets = torch.tensor([0, -1, 2, 3, -1])  # rows 1 and 4: no captions
    mask = torch.zeros(B, B + 6, dtype=torch.bool)
    mask[0, 7] = mask[2, 3] = True  # another caption of row 0's image drawn in the bank; row 3's column is row 2's
    mask[3, 3] = True  # a mask over the row's own target is ignored
    out = CaptionContrastiveLoss(2.0)(**x, caption_candidates=candidates, caption_targets=targets, caption_mask=mask)
    ref = 2.0 * ref_caption_contrastive(x["student_image"], candidates, targets, mask, TEACHER_SCALE)
    assert set(out) == {"caption_contrastive_loss"}
    # at the teacher's fixed scale: the student's own logit scale takes no gradient from it
    assert_same_forward_backward(out["caption_contrastive_loss"], ref, [x["student_image"], x["student_log_scale"]])
    grad = torch.autograd.grad(out["caption_contrastive_loss"], x["student_image"])[0]
    assert grad[[1, 4]].abs().sum() == 0 and grad[[0, 2, 3]].abs().sum() > 0  # uncaptioned rows take no gradient
    mask[:, 7] = True  # a candidate masked for every row is no negative at all: moving it changes nothing
    out = CaptionContrastiveLoss(2.0)(**x, caption_candidates=candidates, caption_targets=targets, caption_mask=mask)
    moved = candidates.clone()
    moved[7] = torch.randn(DT, generator=g)
    again = CaptionContrastiveLoss(2.0)(**x, caption_candidates=moved, caption_targets=targets, caption_mask=mask)
    torch.testing.assert_close(again["caption_contrastive_loss"], out["caption_contrastive_loss"])
    none = CaptionContrastiveLoss(1.0)(**x, caption_candidates=candidates, caption_targets=torch.full((B,), -1),
                                       caption_mask=mask)["caption_contrastive_loss"]
    assert float(none.detach()) == 0.0 and none.requires_grad  # a batch without captions: no term, the graph intact
    assert CaptionContrastiveLoss(0.0)(**x) == {}
    with pytest.raises(ValueError, match="caption_candidates"):
        CaptionContrastiveLoss(1.0)(**x)
    with pytest.raises(ValueError, match=r"caption_mask \(5, 3\) must be \(5,\) and \(5, 11\)"):
        CaptionContrastiveLoss(1.0)(**x, caption_candidates=candidates, caption_targets=targets,
                                    caption_mask=mask[:, :3])
    cfg = LossConfig(caption_contrastive_weight=1.0)
    assert "caption_contrastive_loss" in DistillLoss(cfg)(**x, caption_candidates=candidates, caption_targets=targets,
                                                          caption_mask=mask)
    with pytest.raises(ValueError, match="caption_contrastive_weight"):
        LossConfig(caption_contrastive_weight=-1.0)


def test_caption_bank_kl_checks_its_inputs():
    x = make_inputs()
    with pytest.raises(ValueError, match="caption_bank"):
        CaptionBankKL(1.0)(**x)
    with pytest.raises(ValueError, match="non-empty"):
        CaptionBankKL(1.0)(**x, caption_bank=torch.zeros(0, DT))
    with pytest.raises(ValueError, match="caption_bank has width 5"):
        CaptionBankKL(1.0)(**x, caption_bank=torch.randn(4, 5))
    assert "kl_caption_loss" in DistillLoss(LossConfig(caption_weight=1.0))(**x, caption_bank=torch.randn(4, DT))
    assert "kl_caption_loss" not in DistillLoss(LossConfig())(**x, caption_bank=torch.randn(4, DT))


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_image_affinity_kl_matches_reference(T):
    """Each student image against the teacher's embeddings of the batch's images, as the teacher's own row is."""
    x = make_inputs()
    out = ImageAffinityKL(weight=3.0, temperature=T)(**x)
    t_img = x["teacher_image"]
    ref = 3.0 * ref_kl_class(x["student_image"], t_img, t_img, t_img, x["student_log_scale"], TEACHER_SCALE, T)
    assert set(out) == {"kl_image_affinity_loss"}
    assert_same_forward_backward(out["kl_image_affinity_loss"], ref, [x["student_image"], x["student_log_scale"]])
    # zero when the student is the teacher (its embeddings and scale)
    same = ImageAffinityKL(1.0)(**{**x, "student_image": t_img.clone().requires_grad_(),
                                   "student_log_scale": torch.tensor(math.log(TEACHER_SCALE))})
    torch.testing.assert_close(same["kl_image_affinity_loss"], torch.tensor(0.0), atol=1e-6, rtol=0)
    # a student nearer another image's teacher embedding than its own pays more than one nearer its own
    swapped = ImageAffinityKL(1.0)(**{**x, "student_image": t_img.roll(1, 0),
                                      "student_log_scale": torch.tensor(math.log(TEACHER_SCALE))})
    assert swapped["kl_image_affinity_loss"] > 1.0
    # through a projection when the student is narrower
    narrow = make_inputs(student_dim=DS)
    proj = torch.randn(B, DT, requires_grad=True)
    got = ImageAffinityKL(1.0)(**narrow, student_image_proj=proj)["kl_image_affinity_loss"]
    assert torch.autograd.grad(got, proj)[0].abs().sum() > 0
    assert ImageAffinityKL(0.0)(**x) == {}


def test_image_affinity_kl_checks_its_inputs():
    x = make_inputs()
    with pytest.raises(ValueError, match="teacher_image"):
        ImageAffinityKL(1.0)(**{k: v for k, v in x.items() if k != "teacher_image"})
    with pytest.raises(ValueError, match="student_image has width 6"):
        ImageAffinityKL(1.0)(**make_inputs(student_dim=DS))  # narrower and no projection into the teacher space
    with pytest.raises(ValueError, match="batch sizes differ"):
        ImageAffinityKL(1.0)(**{**x, "teacher_image": x["teacher_image"][:3]})
    with pytest.raises(ValueError, match="image_affinity_weight"):
        LossConfig(image_affinity_weight=-1.0)
    assert "kl_image_affinity_loss" in DistillLoss(LossConfig(image_affinity_weight=1.0))(**x)
    assert "kl_image_affinity_loss" not in DistillLoss(LossConfig())(**x)


# ------------------------------------------------------------------------------------------- CLIP


def test_clip_loss_matches_reference():
    x = make_inputs()
    out = ClipLoss(weight=2.0)(**x)
    ref = 2.0 * ref_clip(x["student_image"], x["student_text"], x["student_log_scale"])
    assert_same_forward_backward(out["clip_loss"], ref, trainable(x))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(1 / 0.07))
    assert not out["logit_scale"].requires_grad


def test_clip_loss_is_symmetric():
    x = make_inputs()
    loss = ClipLoss()(**x)["clip_loss"]
    swapped = ClipLoss()(
        student_image=x["student_text"], student_text=x["student_image"], student_log_scale=x["student_log_scale"]
    )["clip_loss"]
    torch.testing.assert_close(loss, swapped)


def test_clip_loss_with_frozen_teacher_text():
    x = make_inputs()
    out = ClipLoss()(student_image=x["student_image"], teacher_text=x["teacher_text"],
                     student_log_scale=x["student_log_scale"])  # fmt: skip
    ref = ref_clip(x["student_image"], x["teacher_text"], x["student_log_scale"])
    assert_same_forward_backward(out["clip_loss"], ref, [x["student_image"], x["student_log_scale"]])


def test_logit_scale_clamp():
    x = make_inputs()
    at_cap = torch.tensor(LOG_SCALE_MAX, requires_grad=True)
    above = torch.tensor(6.0, requires_grad=True)
    loss_cap = ClipLoss()(**{**x, "student_log_scale": at_cap})["clip_loss"]
    loss_above = ClipLoss()(**{**x, "student_log_scale": above})["clip_loss"]
    torch.testing.assert_close(loss_cap, loss_above)
    torch.testing.assert_close(logit_scale(above), torch.tensor(100.0))
    assert LOG_SCALE_MAX == pytest.approx(4.6052, abs=1e-4)
    (g_above,) = torch.autograd.grad(loss_above, [above])
    assert g_above == 0  # plain clamp: flat above the cap
    (g_below,) = torch.autograd.grad(ClipLoss()(**x)["clip_loss"], [x["student_log_scale"]])
    assert g_below != 0
    param = torch.nn.Parameter(torch.tensor(7.0))
    clamp_log_scale_(param)
    assert param.item() == pytest.approx(LOG_SCALE_MAX)
    with pytest.raises(ValueError, match="student_log_scale"):
        logit_scale(2.0)


# ------------------------------------------------------------------------------- feature and ICL


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_feature_loss_matches_reference(kind):
    x = make_inputs()
    out = FeatureDistillLoss(weight=3.0, kind=kind)(**x)
    assert set(out) == {"feature_image_loss", "feature_text_loss"}
    ref_img = 3.0 * ref_feature(x["student_image"], x["teacher_image"], kind)
    ref_txt = 3.0 * ref_feature(x["student_text"], x["teacher_text"], kind)
    assert_same_forward_backward(out["feature_image_loss"], ref_img, trainable(x))
    assert_same_forward_backward(out["feature_text_loss"], ref_txt, trainable(x))


def test_feature_projection_when_widths_differ():
    assert make_feature_projection(DT, DT) is None
    proj = make_feature_projection(DS, DT)
    assert isinstance(proj, torch.nn.Linear) and (proj.in_features, proj.out_features) == (DS, DT)
    x = make_inputs(student_dim=DS)
    with pytest.raises(ValueError, match="make_feature_projection"):
        FeatureDistillLoss(1.0)(**x)
    with pytest.raises(ValueError, match="student text"):  # image projected, text not
        FeatureDistillLoss(1.0)(**x, student_image_proj=proj(x["student_image"]))
    out = FeatureDistillLoss(1.0)(**x, student_image_proj=proj(x["student_image"]),
                                  student_text_proj=proj(x["student_text"]))  # fmt: skip
    assert set(out) == {"feature_image_loss", "feature_text_loss"}
    img_only = {k: v for k, v in x.items() if k != "student_text"}
    out = FeatureDistillLoss(1.0)(**img_only, student_image_proj=proj(x["student_image"]))
    assert set(out) == {"feature_image_loss"}
    ref = ref_feature(proj(x["student_image"]), x["teacher_image"], "cosine")
    assert_same_forward_backward(out["feature_image_loss"], ref, [proj.weight, x["student_image"]])
    with pytest.raises(ValueError, match="positive int"):
        make_feature_projection(0, DT)


def test_interactive_loss_matches_reference():
    x = make_inputs()
    out = InteractiveContrastiveLoss(weight=0.5)(**x)
    ref = 0.5 * ref_icl(x["student_image"], x["student_text"], x["teacher_image"], x["teacher_text"],
                        x["student_log_scale"])  # fmt: skip
    assert_same_forward_backward(out["interactive_loss"], ref, trainable(x))
    # Without student text only the image direction applies.
    img_only = {k: v for k, v in x.items() if k != "student_text"}
    out = InteractiveContrastiveLoss()(**img_only)
    ref = ref_icl(x["student_image"], None, x["teacher_image"], x["teacher_text"], x["student_log_scale"])
    assert_same_forward_backward(out["interactive_loss"], ref, [x["student_image"], x["student_log_scale"]])


def test_interactive_uses_projection():
    x = make_inputs(student_dim=DS)
    proj = make_feature_projection(DS, DT)
    with pytest.raises(ValueError, match="student_\\*_proj"):
        InteractiveContrastiveLoss()(**x)
    p_img, p_txt = proj(x["student_image"]), proj(x["student_text"])
    out = InteractiveContrastiveLoss()(**x, student_image_proj=p_img, student_text_proj=p_txt)
    ref = ref_icl(p_img, p_txt, x["teacher_image"], x["teacher_text"], x["student_log_scale"])
    assert_same_forward_backward(out["interactive_loss"], ref, [proj.weight, x["student_log_scale"]])


# ------------------------------------------------------------------------------------ composition


def test_distill_loss_is_the_sum_of_its_terms():
    x = make_inputs()
    cfg = LossConfig(kl_weight=0.5, kl_temperature=2.0, clip_weight=1.0, feature_weight=0.3,
                     feature_kind="mse", interactive_weight=0.7)  # fmt: skip
    out = DistillLoss(cfg)(**x)
    assert set(out) == {
        "clip_loss", "logit_scale", "kl_class_loss", "kl_affinity_loss",
        "feature_image_loss", "feature_text_loss", "interactive_loss",
    }  # fmt: skip
    s_img, s_txt, t_img, t_txt, ls = (x[k] for k in
                                      ("student_image", "student_text", "teacher_image", "teacher_text",
                                       "student_log_scale"))  # fmt: skip
    ref = (
        ref_clip(s_img, s_txt, ls)
        + 0.5 * ref_kl_class(s_img, x["student_class"], t_img, x["teacher_class"], ls, TEACHER_SCALE, 2.0)
        + 0.5 * ref_kl_affinity(s_img, s_txt, t_img, t_txt, ls, TEACHER_SCALE, 2.0)
        + 0.3 * (ref_feature(s_img, t_img, "mse") + ref_feature(s_txt, t_txt, "mse"))
        + 0.7 * ref_icl(s_img, s_txt, t_img, t_txt, ls)
    )
    assert_same_forward_backward(total_loss(out), ref, trainable(x))
    assert build_losses(cfg.__dict__).cfg == cfg


def test_student_without_text_tower_works_in_teacher_space():
    """No student_text: text and classes are the teacher's, the image side is the projection."""
    torch.manual_seed(0)  # the projection's init must not depend on which tests ran before
    x = make_inputs(student_dim=DS)
    proj = make_feature_projection(DS, DT)
    s_img, t_img, t_txt, t_cls, ls = (x[k] for k in
                                      ("student_image", "teacher_image", "teacher_text", "teacher_class",
                                       "student_log_scale"))  # fmt: skip
    inputs = {k: v for k, v in x.items() if k not in ("student_text", "student_class")}
    cfg = LossConfig(kl_weight=1.0, kl_temperature=2.0, clip_weight=1.0, feature_weight=1.0, interactive_weight=1.0)
    with pytest.raises(ValueError, match="make_feature_projection"):
        DistillLoss(cfg)(**inputs)
    p_img = proj(s_img)
    out = DistillLoss(cfg)(**inputs, student_image_proj=p_img)
    assert "feature_text_loss" not in out
    ref = (
        ref_clip(p_img, t_txt, ls)
        + ref_kl_class(p_img, t_cls, t_img, t_cls, ls, TEACHER_SCALE, 2.0)
        + ref_kl_affinity(p_img, t_txt, t_img, t_txt, ls, TEACHER_SCALE, 2.0)
        + ref_feature(p_img, t_img, "cosine")
        + ref_icl(p_img, None, t_img, t_txt, ls)
    )
    assert_same_forward_backward(total_loss(out), ref, [proj.weight, s_img, ls])


def test_zero_weights_skip_and_need_no_inputs():
    for loss in (ClipLoss(0), KLDistillLoss(0), FeatureDistillLoss(0), InteractiveContrastiveLoss(0)):
        assert loss() == {}
    # clip only: no teacher inputs needed at all.
    x = make_inputs()
    only_clip = DistillLoss(LossConfig(kl_weight=0, clip_weight=1.0, feature_weight=0))
    out = only_clip(student_image=x["student_image"], student_text=x["student_text"],
                    student_log_scale=x["student_log_scale"])  # fmt: skip
    assert set(out) == {"clip_loss", "logit_scale"}
    # distillation only: no logit-scale parameter needed.
    only_feature = DistillLoss(LossConfig(kl_weight=0, clip_weight=0, feature_weight=1.0))
    out = only_feature(student_image=x["student_image"], teacher_image=x["teacher_image"])
    assert set(out) == {"feature_image_loss"}


def test_missing_input_is_named():
    with pytest.raises(ValueError, match="student_log_scale"):
        ClipLoss()(student_image=torch.randn(B, DT), student_text=torch.randn(B, DT))
    with pytest.raises(ValueError, match="teacher_scale"):
        KLDistillLoss()(**{k: v for k, v in make_inputs().items() if k != "teacher_scale"})
    with pytest.raises(ValueError, match="batch sizes differ"):
        ClipLoss()(student_image=torch.randn(B, DT), student_text=torch.randn(B + 1, DT),
                   student_log_scale=torch.tensor(1.0))  # fmt: skip
    with pytest.raises(ValueError, match="unknown embedding"):
        DistillLoss(LossConfig())(student_img=torch.randn(B, DT))


@pytest.mark.parametrize(
    "field, value",
    [
        ("kl_weight", -1.0),
        ("clip_weight", float("nan")),
        ("feature_weight", "1"),
        ("interactive_weight", True),
        ("kl_temperature", 0.0),
        ("kl_temperature", -2.0),
        ("feature_kind", "l1"),
        ("kl_on_classes", "yes"),
    ],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LossConfig(**{field: value})


def test_invalid_config_combinations():
    with pytest.raises(ValueError, match="kl_on_classes"):
        LossConfig(kl_on_classes=False, kl_on_affinity=False)
    with pytest.raises(ValueError, match="all loss weights"):
        LossConfig(kl_weight=0, clip_weight=0, feature_weight=0)
    with pytest.raises(ValueError, match="unknown loss config field.*kl_temp"):
        build_losses({"kl_temp": 2.0})
    with pytest.raises(ValueError, match="kind"):
        FeatureDistillLoss(1.0, kind="l2")
    with pytest.raises(ValueError, match="temperature"):
        KLDistillLoss(1.0, temperature=0)
    with pytest.raises(ValueError, match="weight"):
        ClipLoss(-0.1)
    with pytest.raises(ValueError, match="no '\\*_loss'"):
        total_loss({"logit_scale": torch.tensor(1.0)})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    """Losses compute in float32 from half-precision inputs, and gradients come back in that dtype."""
    x16 = make_inputs(dtype=dtype)
    x32 = {k: (v.detach().float().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.dim() else v)
           for k, v in x16.items()}  # fmt: skip
    cfg = LossConfig(kl_weight=1.0, clip_weight=1.0, feature_weight=1.0, interactive_weight=1.0)
    out16, out32 = DistillLoss(cfg)(**x16), DistillLoss(cfg)(**x32)
    for k, v in out16.items():
        assert v.dtype == torch.float32 and torch.isfinite(v), k
        torch.testing.assert_close(v, out32[k], rtol=1e-5, atol=1e-5)
    total_loss(out16).backward()
    assert x16["student_image"].grad.dtype == dtype
    assert torch.isfinite(x16["student_image"].grad.float()).all()


def test_multi_positive_clip_loss_reference():
    import torch.nn.functional as F

    from clipcore.contrastive_loss import multi_positive_clip_loss
    from clipcore.losses import ClipLoss

    torch.manual_seed(0)
    img, txt = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    log_scale = torch.tensor(2.0, requires_grad=True)
    # no groups: exactly the CLIP loss
    plain = ClipLoss(1.0)(student_image=img, student_text=txt, student_log_scale=log_scale)["clip_loss"]
    torch.testing.assert_close(multi_positive_clip_loss(img, txt, log_scale), plain)
    groups = torch.tensor([0, 1, 0, 2, 1, 0])
    got = multi_positive_clip_loss(img, txt, log_scale, groups)
    i, t = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = log_scale.exp() * i @ t.t()
    ref = 0.0
    for row in range(6):
        pos = [j for j in range(6) if groups[j] == groups[row]]
        ref = ref - sum(F.log_softmax(logits[row], 0)[j] for j in pos) / len(pos) / 12
        ref = ref - sum(F.log_softmax(logits.t()[row], 0)[j] for j in pos) / len(pos) / 12
    torch.testing.assert_close(got, ref)
    g1 = torch.autograd.grad(got, (img, txt, log_scale))
    g2 = torch.autograd.grad(ref, (img, txt, log_scale))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_one_loss_config_for_recipes_and_losses():
    """The recipe's ``loss`` section is the loss module's LossConfig: one set of defaults, validated once."""
    from distill.config import ConfigError, TrainConfig, load_config

    assert type(TrainConfig().loss) is LossConfig and TrainConfig().loss == LossConfig()
    base = ["teacher.name_or_path=t", "data.train=d"]
    with pytest.raises(ConfigError, match=r"loss\.kl_weight must be a finite number >= 0"):
        load_config(None, [*base, "loss.kl_weight=-1"])
    with pytest.raises(ConfigError, match=r"loss\.feature_kind must be one of"):
        load_config(None, [*base, "loss.feature_kind=l1"])


def test_contrastive_mode_losses_are_loss_modules():
    """Contrastive mode's CLIP and ImageNet soft-target terms, as modules returning weighted dicts."""
    from clipcore.contrastive_loss import MultiPositiveClipLoss, SoftTargetKLLoss, multi_positive_clip_loss

    torch.manual_seed(0)
    img, txt, log_scale = torch.randn(6, 8), torch.randn(6, 8), torch.tensor(2.0)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    out = MultiPositiveClipLoss(0.5)(img, txt, log_scale, groups)
    torch.testing.assert_close(out["clip_loss"], 0.5 * multi_positive_clip_loss(img, txt, log_scale, groups))
    assert MultiPositiveClipLoss(0)(img, txt, log_scale) == {}
    logits, targets = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    got = SoftTargetKLLoss(2.0, temperature=3.0, name="imagenet_kl")(logits, targets)
    p = torch.softmax(targets / 3.0, dim=-1)
    ref = 2.0 * (p * (p.log() - torch.log_softmax(logits, dim=-1))).sum(-1).mean()
    assert_same_forward_backward(got["imagenet_kl_loss"], ref, [logits])
