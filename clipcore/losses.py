"""Contrastive and distillation losses for CLIP students.

Every loss is a small ``nn.Module`` without parameters whose ``forward`` takes embeddings as keyword
arguments and returns a dict. Keys ending in ``_loss`` are already multiplied by their weight and are
summed by the trainer (:func:`total_loss`); other keys are detached metrics. A loss whose weight is 0
returns ``{}`` at once: it reads none of its inputs and runs no collective.

Embedding keywords (B = this process's batch, C = classes, Ds/Dt = student/teacher width). Embeddings
need not be normalised: every loss L2-normalises them and computes in float32, so fp32, bf16 and fp16
inputs all work (gradients flow back in the input dtype). Teacher inputs are detached here.

    student_image       (B, Ds)  student image embeddings
    student_text        (B, Ds)  student text embeddings; absent for a student that keeps the
                                 teacher's frozen text tower, whose text embeddings then *are*
                                 ``teacher_text`` (LiT-style): the losses use those instead, and the
                                 student's image side is ``student_image_proj`` when given
    teacher_image       (B, Dt)
    teacher_text        (B, Dt)
    student_image_proj  (B, Dt)  optional: the student image embeddings mapped into the teacher space
                                 by a projection owned by the trainable module
                                 (:func:`make_feature_projection`); feature and interactive losses
                                 (and all losses for a student without text) use it, and fall back
                                 to ``student_image`` (which must then be Dt)
    student_text_proj   (B, Dt)  the same for text
    student_class       (C, Ds)  optional zero-shot class embeddings in the student space
    teacher_class       (C, Dt)  optional zero-shot class embeddings of the teacher
    student_log_scale   ()       the student's learnable *log* logit scale: a parameter of the
                                 trainable module (never of a loss, which DDP would not wrap),
                                 clamped to ln(100) on use, see :func:`logit_scale`
    teacher_scale       () / float  the teacher's *multiplicative* logit scale (``teacher.logit_scale``)
    student_tower       (B, Ft)  optional: the student's pooled image features mapped by a learned
                                 adapter into the width of the teacher's frozen image tower
    teacher_tower       (B, Ft)  that tower's features of the same images, standardised per dimension

Across processes: losses that compare a row with the rest of the batch (clip, KL affinity,
interactive) compare this rank's rows with the batch gathered from all ranks
(:func:`clipcore.dist.gather_with_grad`) and average over the local rows. Under DDP the averaged
gradient equals the gradient of the same loss on the concatenated global batch (see ``clipcore/dist.py``;
local batches must be equal-sized, so use ``drop_last=True``). With gradient accumulation the negatives
are the current micro-batch from all processes, not the whole accumulated batch.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipcore.dist import check_equal_batch, gather_with_grad, rank

LOG_SCALE_MAX = math.log(100.0)

FEATURE_KINDS = ("cosine", "mse")


# ----------------------------------------------------------------------------------------- helpers


def check_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_temperature(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _require(value, key: str, loss: str):
    if value is None:
        raise ValueError(f"{loss} needs `{key}`, which was not given")
    return value


def logit_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """``exp(min(log_scale, ln 100))`` in float32, shape ().

    A plain clamp: above ln(100) the scale is 100 and the gradient to ``log_scale`` is 0 (the true
    gradient of what is computed). So that the parameter never sits in that flat region, the trainer
    should also clamp the parameter after each optimiser step, as open_clip does
    (:func:`clamp_log_scale_`).
    """
    if not torch.is_tensor(log_scale):
        raise ValueError(
            f"student_log_scale must be a tensor (a parameter of the trainable module), got {log_scale!r}"
        )
    if log_scale.numel() != 1:
        raise ValueError(f"student_log_scale must hold one value, got shape {tuple(log_scale.shape)}")
    return log_scale.float().reshape(()).clamp(max=LOG_SCALE_MAX).exp()


@torch.no_grad()
def clamp_log_scale_(log_scale: torch.Tensor) -> torch.Tensor:
    """In place: clamp a log-logit-scale parameter to [0, ln 100] (call after ``optimizer.step()``)."""
    return log_scale.clamp_(0.0, LOG_SCALE_MAX)


def _teacher_scale(scale, device: torch.device) -> torch.Tensor:
    if torch.is_tensor(scale):
        if scale.numel() != 1:
            raise ValueError(f"teacher_scale must hold one value, got shape {tuple(scale.shape)}")
        return scale.detach().float().reshape(()).to(device)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"teacher_scale must be a positive number or tensor, got {scale!r}")
    return torch.tensor(float(scale), device=device)


def _same_dim(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str, loss: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{loss}: {a_name} has width {a.shape[-1]} but {b_name} has width {b.shape[-1]}; map the student "
            "into the teacher space with a projection owned by the trainable module "
            "(make_feature_projection) and pass its output as student_*_proj"
        )


class EmbeddingCache:
    """Normalises (float32) and gathers each embedding tensor once per training step.

    :class:`clipcore.distill_loss.DistillLoss` shares one cache between its losses, so a tensor
    used by several of them is gathered once; a loss called alone makes its own. Keyed by tensor identity: build a new cache
    every step. The first gather also checks that all ranks have the same local batch size.
    """

    def __init__(self):
        self._norm: dict = {}
        self._all: dict = {}
        self._sizes_checked = False

    def norm(self, x: torch.Tensor, detach: bool = False) -> torch.Tensor:
        key = (id(x), detach)
        if key not in self._norm:
            src = x.detach() if detach else x
            self._norm[key] = (x, F.normalize(src.float(), dim=-1))  # holding x keeps its id unique
        return self._norm[key][1]

    def gathered(self, x: torch.Tensor, detach: bool = False) -> torch.Tensor:
        key = (id(x), detach)
        if key not in self._all:
            local = self.norm(x, detach)
            if not self._sizes_checked:
                check_equal_batch(local.shape[0], local.device)
                self._sizes_checked = True
            self._all[key] = (x, gather_with_grad(local, check_sizes=False))
        return self._all[key][1]


def _check_batch(loss: str, **tensors) -> int:
    sizes = {k: v.shape[0] for k, v in tensors.items() if v is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{loss}: batch sizes differ {sizes}")
    for k, v in tensors.items():
        if v is not None and v.dim() != 2:
            raise ValueError(f"{loss}: {k} must have shape (B, D), got {tuple(v.shape)}")
    return next(iter(sizes.values()))


def _in_teacher_space(raw, proj):
    return proj if proj is not None else raw


def _student_pair(student_image, student_text, student_image_proj, teacher_text, loss: str):
    """(image, text, text is the teacher's) for terms that compare the student's image and text sides.

    A student without its own text tower embeds text with the teacher's (frozen) tower, so its text
    side is ``teacher_text`` and its image side must live in the teacher space: the projection when
    the trainable module has one, else ``student_image``.
    """
    if student_text is not None:
        return _require(student_image, "student_image", loss), student_text, False
    image = _require(_in_teacher_space(student_image, student_image_proj), "student_image", loss)
    return image, _require(teacher_text, "teacher_text (or student_text)", loss), True


def _global_labels(batch: int, device: torch.device) -> torch.Tensor:
    # This rank's rows sit at rank*B .. rank*B + B - 1 of the gathered batch (open_clip's labels).
    return torch.arange(batch, device=device) + rank() * batch


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over rows (batchmean).

    Args:
        student_logits: (N, K).
        teacher_logits: (N, K); detached here (a target).
        T: temperature > 0. The T^2 factor keeps gradient magnitudes comparable across temperatures
            (Hinton et al.).

    Returns:
        float32 scalar.
    """
    T = check_temperature("T", T)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kl_distill: logits shapes differ {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    log_p_s = F.log_softmax(student_logits.float() / T, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / T, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)


# ------------------------------------------------------------------------------------------ losses


class ClipLoss(nn.Module):
    """Symmetric InfoNCE of the student: mean of image->text and text->image cross-entropy.

    Negatives are the batch gathered from all processes; labels are ``arange(B) + rank * B``. Without
    ``student_text`` the text side is the (frozen) ``teacher_text`` (a LiT-style student that keeps the
    teacher's text tower) and the image side ``student_image_proj`` if given, else ``student_image``.

    Returns ``{"clip_loss", "logit_scale"}`` (the latter a metric).
    """

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = check_weight("ClipLoss weight", weight)

    def forward(
        self,
        student_image: torch.Tensor | None = None,
        student_text: torch.Tensor | None = None,
        teacher_text: torch.Tensor | None = None,
        student_image_proj: torch.Tensor | None = None,
        student_log_scale: torch.Tensor | None = None,
        cache: EmbeddingCache | None = None,
        **_unused,
    ) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            return {}
        name = "ClipLoss"
        image, text, frozen_text = _student_pair(student_image, student_text, student_image_proj, teacher_text, name)
        scale = logit_scale(_require(student_log_scale, "student_log_scale", name))
        _same_dim(image, text, "student_image", "teacher_text" if frozen_text else "student_text", name)
        batch = _check_batch(name, student_image=image, text=text)
        cache = cache or EmbeddingCache()

        img, txt = cache.norm(image), cache.norm(text, detach=frozen_text)
        all_img, all_txt = cache.gathered(image), cache.gathered(text, detach=frozen_text)
        labels = _global_labels(batch, img.device)
        loss = (
            F.cross_entropy(scale * img @ all_txt.t(), labels) + F.cross_entropy(scale * txt @ all_img.t(), labels)
        ) / 2
        return {"clip_loss": self.weight * loss, "logit_scale": scale.detach()}


class KLDistillLoss(nn.Module):
    """Logit distillation at temperature ``T`` (see :func:`kl_distill`), on two sets of logits:

    * classes (``on_classes``, when ``teacher_class`` is given): ``s * student_image @ student_class.T``
      against ``t * teacher_image @ teacher_class.T``. Without ``student_text``, ``student_class``
      defaults to ``teacher_class`` (the student embeds text with the teacher's tower);
    * in-batch affinities (``on_affinity``): image->text and text->image logits of the student against
      the teacher's, over the batch gathered from all processes, averaged over the two directions.
      Without ``student_text`` the student's text side is ``teacher_text``.

    Without ``student_text`` the student image side is ``student_image_proj`` when given (the student
    then compares images with text and classes embedded in the teacher space).

    ``s = logit_scale(student_log_scale)`` and ``t = teacher_scale``. Returns ``{"kl_class_loss",
    "kl_affinity_loss"}`` (those that apply), each multiplied by ``weight``.
    """

    def __init__(
        self, weight: float = 1.0, temperature: float = 1.0, on_classes: bool = True, on_affinity: bool = True
    ):
        super().__init__()
        self.weight = check_weight("KLDistillLoss weight", weight)
        self.temperature = check_temperature("KLDistillLoss temperature", temperature)
        if not isinstance(on_classes, bool) or not isinstance(on_affinity, bool):
            raise ValueError(f"on_classes/on_affinity must be bools, got {on_classes!r}, {on_affinity!r}")
        if self.weight > 0 and not (on_classes or on_affinity):
            raise ValueError("KLDistillLoss: on_classes and on_affinity are both False; set weight to 0 instead")
        self.on_classes = on_classes
        self.on_affinity = on_affinity

    def forward(
        self,
        student_image: torch.Tensor | None = None,
        teacher_image: torch.Tensor | None = None,
        student_text: torch.Tensor | None = None,
        teacher_text: torch.Tensor | None = None,
        student_class: torch.Tensor | None = None,
        teacher_class: torch.Tensor | None = None,
        student_image_proj: torch.Tensor | None = None,
        student_log_scale: torch.Tensor | None = None,
        teacher_scale=None,
        cache: EmbeddingCache | None = None,
        **_unused,
    ) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            return {}
        name = "KLDistillLoss"
        do_classes = self.on_classes and teacher_class is not None
        if not (do_classes or self.on_affinity):
            return {}
        if student_text is None:  # text lives in the teacher space, so must the student image side
            student_image = _in_teacher_space(student_image, student_image_proj)
        s_image = _require(student_image, "student_image", name)
        t_image = _require(teacher_image, "teacher_image", name)
        s_scale = logit_scale(_require(student_log_scale, "student_log_scale", name))
        t_scale = _teacher_scale(_require(teacher_scale, "teacher_scale", name), s_scale.device)
        _check_batch(
            name, student_image=s_image, teacher_image=t_image, student_text=student_text, teacher_text=teacher_text
        )
        cache = cache or EmbeddingCache()
        T = self.temperature
        out: dict[str, torch.Tensor] = {}

        if do_classes:
            if student_class is None:
                if student_text is not None:
                    raise ValueError(
                        f"{name}: a student with its own text tower must pass student_class along with teacher_class"
                    )
                student_class = teacher_class
            _same_dim(s_image, student_class, "student_image", "student_class", name)
            s_logits = s_scale * cache.norm(s_image) @ cache.norm(student_class).t()
            t_logits = t_scale * cache.norm(t_image, detach=True) @ cache.norm(teacher_class, detach=True).t()
            out["kl_class_loss"] = self.weight * kl_distill(s_logits, t_logits, T)

        if self.on_affinity:
            t_text = _require(teacher_text, "teacher_text", name)
            s_text = student_text if student_text is not None else t_text
            frozen_text = student_text is None
            _same_dim(s_image, s_text, "student_image", "teacher_text" if frozen_text else "student_text", name)
            s_img, s_txt = cache.norm(s_image), cache.norm(s_text, detach=frozen_text)
            t_img, t_txt = cache.norm(t_image, detach=True), cache.norm(t_text, detach=True)
            s_all_img, s_all_txt = cache.gathered(s_image), cache.gathered(s_text, detach=frozen_text)
            t_all_img, t_all_txt = cache.gathered(t_image, detach=True), cache.gathered(t_text, detach=True)
            i2t = kl_distill(s_scale * s_img @ s_all_txt.t(), t_scale * t_img @ t_all_txt.t(), T)
            t2i = kl_distill(s_scale * s_txt @ s_all_img.t(), t_scale * t_txt @ t_all_img.t(), T)
            out["kl_affinity_loss"] = self.weight * (i2t + t2i) / 2
        return out


def make_feature_projection(student_dim: int, teacher_dim: int) -> nn.Module | None:
    """A trainable map from the student embedding space to the teacher's, or None when widths match.

    Returns ``nn.Linear(student_dim, teacher_dim, bias=False)``. It must be an attribute of the
    trainable module handed to ``accelerator.prepare`` (so DDP syncs it and the optimiser sees it);
    feed its outputs to the losses as ``student_image_proj`` / ``student_text_proj``.
    """
    for n, v in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{n} must be a positive int, got {v!r}")
    if student_dim == teacher_dim:
        return None
    return nn.Linear(student_dim, teacher_dim, bias=False)


class FeatureDistillLoss(nn.Module):
    """Student embeddings against teacher embeddings, both L2-normalised.

    ``kind="cosine"``: ``mean(1 - cos)`` over rows. ``kind="mse"``: ``F.mse_loss`` of the normalised
    embeddings, a mean over all B*Dt elements (CLIP-KD's FD, so its large weights transfer; per row
    this is ``(2 - 2 cos) / Dt``). Uses ``student_*_proj`` when given. Returns
    ``{"feature_image_loss"}`` plus ``"feature_text_loss"`` when the student has text embeddings,
    each multiplied by ``weight``.
    """

    def __init__(self, weight: float = 1.0, kind: str = "cosine"):
        super().__init__()
        self.weight = check_weight("FeatureDistillLoss weight", weight)
        if kind not in FEATURE_KINDS:
            raise ValueError(f"FeatureDistillLoss kind must be one of {FEATURE_KINDS}, got {kind!r}")
        self.kind = kind

    def _distance(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, t = F.normalize(s.float(), dim=-1), F.normalize(t.detach().float(), dim=-1)
        if self.kind == "cosine":
            return (1 - (s * t).sum(-1)).mean()
        return F.mse_loss(s, t)

    def forward(
        self,
        student_image: torch.Tensor | None = None,
        teacher_image: torch.Tensor | None = None,
        student_text: torch.Tensor | None = None,
        teacher_text: torch.Tensor | None = None,
        student_image_proj: torch.Tensor | None = None,
        student_text_proj: torch.Tensor | None = None,
        **_unused,
    ) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            return {}
        name = "FeatureDistillLoss"
        s_image = _in_teacher_space(student_image, student_image_proj)
        _require(s_image, "student_image", name)
        t_image = _require(teacher_image, "teacher_image", name)
        _same_dim(s_image, t_image, "the student image embedding", "teacher_image", name)
        _check_batch(name, student_image=s_image, teacher_image=t_image)
        out = {"feature_image_loss": self.weight * self._distance(s_image, t_image)}
        s_text = _in_teacher_space(student_text, student_text_proj)
        if s_text is not None:
            t_text = _require(teacher_text, "teacher_text", name)
            _same_dim(s_text, t_text, "the student text embedding", "teacher_text", name)
            _check_batch(name, student_text=s_text, teacher_text=t_text)
            out["feature_text_loss"] = self.weight * self._distance(s_text, t_text)
        return out


class TowerHintLoss(nn.Module):
    """A FitNets-style hint below the embedding: ``F.mse_loss(student_tower, teacher_tower)``.

    The teacher's embedding is a head applied to its image tower's pooled features; those features
    (1,280 numbers per image for EfficientNet-Lite2, against 512 in the embedding) carry what the head
    drops, and a data-limited student may learn more from every image by matching them too. The
    caller maps the student's pooled features through its own adapter and standardises the teacher's
    per dimension (their scales differ by dimension), so a weight of 1 starts the term near 1.
    Returns ``{"tower_loss"}``.
    """

    def __init__(self, weight: float = 0.0):
        super().__init__()
        self.weight = check_weight("TowerHintLoss weight", weight)

    def forward(self, student_tower: torch.Tensor | None = None, teacher_tower: torch.Tensor | None = None,
                **_unused) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            return {}
        name = "TowerHintLoss"
        s = _require(student_tower, "student_tower", name)
        t = _require(teacher_tower, "teacher_tower", name)
        _check_batch(name, student_tower=s, teacher_tower=t)
        if s.shape[-1] != t.shape[-1]:
            raise ValueError(f"{name}: student_tower has width {s.shape[-1]} but teacher_tower has width {t.shape[-1]}; "
                             "the adapter must map the student's pooled features to the teacher tower's width")
        return {"tower_loss": self.weight * F.mse_loss(s.float(), t.detach().float())}


def _kl_over_rows(name: str, s_image: torch.Tensor, t_image: torch.Tensor, rows: torch.Tensor, student_log_scale,
                  teacher_scale, cache: EmbeddingCache, T: float) -> torch.Tensor:
    """``kl_distill`` of the student's and the teacher's image rows, each scored against the same normalised ``rows``
    at its own logit scale (the caption bank's captions, the batch's teacher images)."""
    s_scale = logit_scale(_require(student_log_scale, "student_log_scale", name))
    t_scale = _teacher_scale(_require(teacher_scale, "teacher_scale", name), s_scale.device)
    s_logits = s_scale * cache.norm(s_image) @ rows.t()
    t_logits = t_scale * cache.norm(t_image, detach=True) @ rows.t()
    return kl_distill(s_logits, t_logits, T)


class CaptionBankKL(nn.Module):
    """The teacher's image->caption affinities over a bank of captions (TinyCLIP's affinity mimicking,
    with a fixed text bank instead of the batch's texts).

    ``caption_bank`` holds the teacher's embeddings of captions (any number of rows, e.g. a per-step
    sample of a photo set's captions); every image of the batch, student and teacher, is scored
    against all of them: ``kl_distill(s * student_image @ bank.T, t * teacher_image @ bank.T, T)``. The
    class KL does this over class prompts; captions are sentences about whole scenes, whose fine
    directions image->text retrieval rests on. The bank is the teacher's text, so the student image
    side is ``student_image_proj`` when given (the teacher space). Returns ``{"kl_caption_loss"}``.
    """

    def __init__(self, weight: float = 0.0, temperature: float = 1.0):
        super().__init__()
        self.weight = check_weight("CaptionBankKL weight", weight)
        self.temperature = check_temperature("CaptionBankKL temperature", temperature)

    def forward(self, student_image: torch.Tensor | None = None, teacher_image: torch.Tensor | None = None,
                caption_bank: torch.Tensor | None = None, student_image_proj: torch.Tensor | None = None,
                student_log_scale: torch.Tensor | None = None, teacher_scale=None,
                cache: EmbeddingCache | None = None, **_unused) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            return {}
        name = "CaptionBankKL"
        s_image = _require(_in_teacher_space(student_image, student_image_proj), "student_image", name)
        t_image = _require(teacher_image, "teacher_image", name)
        bank = _require(caption_bank, "caption_bank", name)
        if bank.dim() != 2 or bank.shape[0] == 0:
            raise ValueError(f"{name}: caption_bank must be a non-empty (N, D) matrix, got shape {tuple(bank.shape)}")
        _check_batch(name, student_image=s_image, teacher_image=t_image)
        _same_dim(s_image, bank, "student_image", "caption_bank", name)
        _same_dim(t_image, bank, "teacher_image", "caption_bank", name)
        bank = F.normalize(bank.detach().float(), dim=-1)
        kl = _kl_over_rows(name, s_image, t_image, bank, student_log_scale, teacher_scale, cache or EmbeddingCache(),
                           self.temperature)
        return {"kl_caption_loss": self.weight * kl}


class CaptionContrastiveLoss(nn.Module):
    """CLIP-KD's interactive contrastive loss with the photos' own captions: each student image with captions is
    scored against the teacher's embeddings of ``caption_candidates`` (its own caption among captions of other
    images) and trained by cross-entropy to rank its own first, at the teacher's logit scale: a fixed scale, so the
    term leaves the student's learnable one to the KL terms, which match it against the teacher's distributions.

    ``caption_targets`` (B,) is the column of each row's own caption in ``caption_candidates`` (N, Dt), or -1 for a
    row without captions (skipped); ``caption_mask`` (B, N) is True where a candidate is another caption of the
    row's own image (another view of it, or a bank draw of it): those are left out, not counted as negatives. Where
    the class and caption-bank KLs copy the teacher's affinities, this term uses what the captions say about their
    image, which the teacher (aligned on class prompts) only partly knows. Per process: the candidates are the
    same on every rank (the bank) plus this rank's own captions. Returns ``{"caption_contrastive_loss"}``.
    """

    def __init__(self, weight: float = 0.0):
        super().__init__()
        self.weight = check_weight("CaptionContrastiveLoss weight", weight)

    def forward(self, student_image: torch.Tensor | None = None, student_image_proj: torch.Tensor | None = None,
                caption_candidates: torch.Tensor | None = None, caption_targets: torch.Tensor | None = None,
                caption_mask: torch.Tensor | None = None, teacher_scale=None,
                cache: EmbeddingCache | None = None, **_unused) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            return {}
        name = "CaptionContrastiveLoss"
        s_image = _require(_in_teacher_space(student_image, student_image_proj), "student_image", name)
        candidates = _require(caption_candidates, "caption_candidates", name)
        targets = _require(caption_targets, "caption_targets", name)
        mask = _require(caption_mask, "caption_mask", name)
        scale = torch.as_tensor(_require(teacher_scale, "teacher_scale", name), dtype=torch.float32).detach()
        _same_dim(s_image, candidates, "student_image", "caption_candidates", name)
        if targets.shape != (s_image.shape[0],) or mask.shape != (s_image.shape[0], candidates.shape[0]):
            raise ValueError(f"{name}: caption_targets {tuple(targets.shape)} and caption_mask {tuple(mask.shape)} must "
                             f"be ({s_image.shape[0]},) and ({s_image.shape[0]}, {candidates.shape[0]})")
        keep = targets >= 0
        if not bool(keep.any()):  # a batch without captioned rows: no term, but the graph stays connected
            return {"caption_contrastive_loss": s_image.float().sum() * 0.0}
        image = F.normalize(s_image[keep].float(), dim=-1)
        text = F.normalize(candidates.detach().float(), dim=-1)
        others = mask[keep].clone()
        others[torch.arange(others.shape[0], device=others.device), targets[keep]] = False  # never the row's own
        logits = (scale.to(image.device) * image @ text.T).masked_fill(others, float("-inf"))
        loss = F.cross_entropy(logits, targets[keep])
        return {"caption_contrastive_loss": self.weight * loss}


class ImageAffinityKL(nn.Module):
    """The teacher's image->image affinities within the batch (relational distillation, CLIP-KD's CRD family).

    Each student image row is scored against the teacher's embeddings of every image of the batch
    (gathered from all processes) and matched to the teacher's own row scored the same way:
    ``kl_distill(s * student_image @ T_all.T, t * teacher_image @ T_all.T, T)``. The cosine feature loss pulls
    every direction of the embedding alike; this term asks the student's embedding to be nearer its own
    image's teacher embedding than to the other images' *in the proportions the teacher's are*, which is
    what ranking many photos against each other (retrieval) rests on. Gradients reach the student row only.
    The student image side is ``student_image_proj`` when given (the teacher space). Returns
    ``{"kl_image_affinity_loss"}``.
    """

    def __init__(self, weight: float = 0.0, temperature: float = 1.0):
        super().__init__()
        self.weight = check_weight("ImageAffinityKL weight", weight)
        self.temperature = check_temperature("ImageAffinityKL temperature", temperature)

    def forward(self, student_image: torch.Tensor | None = None, teacher_image: torch.Tensor | None = None,
                student_image_proj: torch.Tensor | None = None, student_log_scale: torch.Tensor | None = None,
                teacher_scale=None, cache: EmbeddingCache | None = None, **_unused) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            return {}
        name = "ImageAffinityKL"
        s_image = _require(_in_teacher_space(student_image, student_image_proj), "student_image", name)
        t_image = _require(teacher_image, "teacher_image", name)
        _check_batch(name, student_image=s_image, teacher_image=t_image)
        _same_dim(s_image, t_image, "student_image", "teacher_image", name)
        cache = cache or EmbeddingCache()
        kl = _kl_over_rows(name, s_image, t_image, cache.gathered(t_image, detach=True), student_log_scale,
                           teacher_scale, cache, self.temperature)
        return {"kl_image_affinity_loss": self.weight * kl}


class InteractiveContrastiveLoss(nn.Module):
    """CLIP-KD's interactive contrastive learning (ICL).

    Student image rows against the teacher text embeddings of the batch gathered from all processes
    (cross-entropy, positives on the diagonal, student logit scale), and student text rows against the
    gathered teacher image embeddings; the two directions are averaged. Without student text only
    the image direction applies. Uses ``student_*_proj`` when given. Returns ``{"interactive_loss"}``.
    """

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = check_weight("InteractiveContrastiveLoss weight", weight)

    def forward(
        self,
        student_image: torch.Tensor | None = None,
        teacher_text: torch.Tensor | None = None,
        student_text: torch.Tensor | None = None,
        teacher_image: torch.Tensor | None = None,
        student_image_proj: torch.Tensor | None = None,
        student_text_proj: torch.Tensor | None = None,
        student_log_scale: torch.Tensor | None = None,
        cache: EmbeddingCache | None = None,
        **_unused,
    ) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            return {}
        name = "InteractiveContrastiveLoss"
        s_image = _require(_in_teacher_space(student_image, student_image_proj), "student_image", name)
        t_text = _require(teacher_text, "teacher_text", name)
        scale = logit_scale(_require(student_log_scale, "student_log_scale", name))
        s_text = _in_teacher_space(student_text, student_text_proj)
        if s_text is not None:
            _require(teacher_image, "teacher_image", name)
            _same_dim(s_text, teacher_image, "the student text embedding", "teacher_image", name)
        _same_dim(s_image, t_text, "the student image embedding", "teacher_text", name)
        t_image = teacher_image if s_text is not None else None
        batch = _check_batch(
            name, student_image=s_image, teacher_text=t_text, student_text=s_text, teacher_image=t_image
        )
        cache = cache or EmbeddingCache()
        labels = _global_labels(batch, s_image.device)

        losses = [F.cross_entropy(scale * cache.norm(s_image) @ cache.gathered(t_text, detach=True).t(), labels)]
        if s_text is not None:
            t_all_image = cache.gathered(teacher_image, detach=True)
            losses.append(F.cross_entropy(scale * cache.norm(s_text) @ t_all_image.t(), labels))
        return {"interactive_loss": self.weight * sum(losses) / len(losses)}


def total_loss(losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the entries whose key ends in ``_loss`` (open_clip's convention); others are metrics."""
    terms = [v for k, v in losses.items() if k.endswith("_loss")]
    if not terms:
        raise ValueError(f"no '*_loss' entries to sum in {sorted(losses)}")
    return torch.stack([t.float().reshape(()) for t in terms]).sum()
