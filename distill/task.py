"""The distillation task: trainable student + frozen teacher + losses in one module.

Everything trainable (the student with its own logit scale, feature projections) lives in
:class:`DistillTask`, the one module handed to ``accelerator.prepare``. The teacher is kept out of the module tree on purpose: it is never wrapped in DDP, never seen by the optimizer
and never saved in checkpoints; it is forced back to ``eval()`` whenever the task is trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from clipcore.augment import MixSpec, StudentJitter, normalise, preprocess_tensor, unnormalise
from clipcore.cache import NonFiniteTargets
from clipcore.distill_loss import DistillLoss, LossConfig
from clipcore.dual_encoder import DualEncoder
from clipcore.losses import clamp_log_scale_, make_feature_projection, total_loss
from distill.config import QATConfig


def finite_teacher(targets: torch.Tensor, what: str, step: int) -> torch.Tensor:
    """``targets`` the teacher computed online this step, refused when not finite: a NaN teacher is bad
    input to name, not a diverged student (the cached path checks them once, in clipcore.cache)."""
    bad = ~torch.isfinite(targets).flatten(1).all(dim=1)
    if bad.any():
        raise NonFiniteTargets(f"the teacher gives NaN/inf {what} embeddings for {int(bad.sum())} of {len(targets)} "
                               f"rows of the batch at step {step} (cache.enabled=false: the teacher runs online)")
    return targets


class TrainingTask(Protocol):
    """What the training loop asks of a task module (:class:`DistillTask`, ``ContrastiveTask``)."""

    def __call__(self, batch: dict, step: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """The loss dict of one batch; ``loss`` is the sum of the ``*_loss`` entries."""

    def clamp_logit_scale_(self) -> None:
        """Keep the learnable log logit scale in range after an optimiser step."""

    def export_student(self) -> DualEncoder:
        """The trained model to save and export."""

    def parity_reference(self) -> DualEncoder:
        """The model the exported variants are checked against."""

    def agreement_reference(self) -> DualEncoder | None:
        """The torch model the exported files must agree with, if not the exported student itself."""


@dataclass
class TextBank:
    """Every text the run trains on (class prompts and captions), tokenised once for the student,
    with the teacher's embeddings looked up by row instead of recomputed each step."""

    texts: list[str]
    student_ids: torch.Tensor | None  # (M, L) long; None for image-only students
    student_mask: torch.Tensor | None
    teacher_emb: torch.Tensor  # (M, D_teacher) normalised
    prompt_rows: torch.Tensor  # (C, T) rows of "template t applied to class c"
    caption_rows: list[list[int]]  # dataset row -> rows of its captions ([] for label-only data)
    # dataset row -> rows of its own captions, also where they are not its affinity texts (caption_affinity: false);
    # None: the same as caption_rows
    own_captions: list[list[int]] | None = None

    def captions_of(self, row: int) -> list[int]:
        rows = self.caption_rows if self.own_captions is None else self.own_captions
        return rows[row] if rows else []


class DistillTask(nn.Module):
    """Computes the loss dict for one batch. Keys ending in ``_loss`` are summed into ``loss``."""

    def __init__(self, student: DualEncoder, teacher: DualEncoder, loss_cfg: LossConfig, bank: TextBank,
                 teacher_class_head: torch.Tensor | None, jitter: StudentJitter = StudentJitter(),
                 mix: MixSpec = MixSpec(), self_reference: DualEncoder | None = None,
                 tower_hint: nn.Module | None = None, qat_cfg: QATConfig = QATConfig()):
        super().__init__()
        self.student = student
        self.tower_hint = tower_hint  # loss.tower_weight: distill.tower_hint.TowerHint, trained with the student
        self.jitter = jitter
        self.mix = mix
        self._teacher = [teacher]  # a list hides it from nn.Module: no DDP, no optimizer, no state_dict
        # qat.target=self: the frozen fp32 student whose image embeddings are the targets instead of the teacher's
        self._self_reference = [self_reference]
        self.qat = None  # QAT's handle (students.qat.QATHandle), set by the builder when qat.enabled
        self.qat_cfg = qat_cfg  # qat.consistency*: the rounded-vs-unrounded loss (its weight, what it compares)
        self.losses = DistillLoss(loss_cfg)
        self.loss_cfg = loss_cfg
        self._step = 0  # the step of the batch in hand, for error messages
        self.bank = bank
        self.register_buffer("teacher_class_head", teacher_class_head, persistent=False)
        s_dim, t_dim = student.embed_dim, teacher.embed_dim
        # learned maps into the teacher space, only where the widths differ (None otherwise)
        self.image_proj = make_feature_projection(s_dim, t_dim)
        self.text_proj = make_feature_projection(s_dim, t_dim) if self.student.has_own_text_tower else None

    @property
    def teacher(self) -> DualEncoder:
        return self._teacher[0]

    def train(self, mode: bool = True) -> "DistillTask":
        super().train(mode)
        self.teacher.eval()  # dropout/BN in the teacher must never switch to training behaviour
        if self._self_reference[0] is not None or self.qat_cfg.consistency > 0:
            # qat.target=self / qat.consistency: the student must compute what its fp32 self computes, rounding aside; with
            # EfficientNet's drop-connect on, the loss measured dropped blocks, not rounding (QAT's observers
            # update on any step with gradients, whatever the mode)
            self.student.eval()
        return self

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep the learnable log scale in [0, ln 100] after each step (open_clip does the same),
        so it never sits above the cap where its gradient is zero."""
        clamp_log_scale_(self.student.log_logit_scale)

    def export_student(self) -> DualEncoder:
        """The student to save (its logit scale is its own: nothing to copy back)."""
        return self.student

    def parity_reference(self) -> DualEncoder:
        """What the exported student's variants are checked against: the teacher."""
        return self.teacher

    def agreement_reference(self) -> DualEncoder | None:
        """qat.target=self: the fp32 student the int8 export replaces; else None (the student itself)."""
        return self._self_reference[0]

    def _sample_texts(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """One text row per image: a random caption of that image, or a random class prompt.

        Prompts are drawn independently of the labels, so label-free image data still gives
        the text tower and the affinity KL paired targets.
        """
        rows = []
        if not self.bank.caption_rows and self.bank.prompt_rows.numel() == 0:
            raise ValueError("a training sample has no caption and there are no class prompts: "
                             "set data.classnames=... or give every sample a caption")
        for idx in batch["index"].tolist():
            caps = self.bank.caption_rows[idx] if self.bank.caption_rows else []
            if caps:
                rows.append(caps[int(torch.randint(len(caps), (1,), generator=generator))])
            else:
                c, t = (int(torch.randint(n, (1,), generator=generator)) for n in self.bank.prompt_rows.shape)
                rows.append(int(self.bank.prompt_rows[c, t]))
        return torch.tensor(rows, dtype=torch.long)

    def _streamed_texts(self, batch: dict, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher (precomputed in the sidecar, or online) and student embeddings of the batch's captions."""
        t_txt = batch.get("teacher_text")
        if t_txt is None:
            with torch.no_grad():
                t_txt = finite_teacher(self.teacher.encode_text(texts), "text", self._step)
        if not self.student.has_own_text_tower:
            return t_txt, None
        tokens = self.student.tokenize(texts)
        mask = tokens.get("attention_mask", torch.ones_like(tokens["input_ids"]))
        return t_txt, self.student.encode_tokens(tokens["input_ids"].to(device), mask.to(device))

    def _student_class_head(self, generator: torch.Generator, device) -> torch.Tensor | None:
        """Student class embeddings from one random template per class (a cheap unbiased draw
        of the template-averaged head); image-only students use the teacher's head."""
        if self.teacher_class_head is None:
            return None
        if not self.student.has_own_text_tower:
            return self.teacher_class_head
        C, T = self.bank.prompt_rows.shape
        pick = torch.randint(T, (C,), generator=generator)
        rows = self.bank.prompt_rows[torch.arange(C), pick]
        emb = self.student.encode_tokens(self.bank.student_ids[rows].to(device), self.bank.student_mask[rows].to(device))
        return F.normalize(emb, dim=-1)

    def _mix(self, pixels: torch.Tensor, teacher_image: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``data.mix``: replace a share of the batch by mixes of its images, with the teacher's
        embeddings of the mixes computed now. The teacher sees each mix at the student's resolution,
        resized to its own input: the pixels the teacher's own transform sees (up to torch's resampling
        kernel) when the sources are no larger than the student's input (Tiny-ImageNet at 64 px), a
        blurrier view than the teacher's own of larger photos."""
        images = unnormalise(pixels.float(), self.student.image_transform)
        rows, mixes = self.mix(images, generator)
        if rows.numel() == 0:
            return pixels, teacher_image
        with torch.no_grad():
            target = finite_teacher(self.teacher.encode_image(preprocess_tensor(mixes, self.teacher.image_transform)),
                                    "image (mix)", self._step)
        student_in = normalise(mixes, self.student.image_transform).to(pixels.dtype)
        return (pixels.index_copy(0, rows, student_in),
                teacher_image.index_copy(0, rows, target.to(teacher_image.dtype)))

    def forward(self, batch: dict, step: int, seed: int = 0) -> dict[str, torch.Tensor]:
        # a generator seeded by (seed, step) makes text sampling identical after a resume
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        device = batch["pixel_values_student"].device
        self._step = step
        teacher_image = batch.get("teacher_image")
        if teacher_image is None:
            with torch.no_grad():
                teacher_image = finite_teacher(self.teacher.encode_image(batch["pixel_values_teacher"]), "image", step)
        pixels = batch["pixel_values_student"]
        if self.training and self.mix:
            pixels, teacher_image = self._mix(pixels, teacher_image,
                                              torch.Generator().manual_seed(seed * 1_000_003 + step + 700_001))
        if self.training and self.jitter:
            # its own generator, so that runs with and without jitter sample the same texts
            pixels = self.jitter(pixels, torch.Generator().manual_seed(seed * 1_000_003 + step + 500_009),
                                 batch.get("index"))
        s_img = self.student.encode_image(pixels)
        teacher_scale = self.teacher.logit_scale.detach()
        reference = self._self_reference[0]
        if reference is not None:  # the fp32 self on exactly the pixels the fake-quantised student saw
            with torch.no_grad():
                teacher_image, teacher_scale = reference.encode_image(pixels), reference.logit_scale.detach()
        s_tower = t_tower = None
        if self.tower_hint is not None:  # after the student's forward, whose pooled features its pre-hook kept
            s_tower, t_tower = self.tower_hint(batch.get("teacher_tower"))
        consistency = self._qat_consistency(pixels, s_img)
        texts = batch.get("text")
        text_rows = None
        if texts is not None and all(t is not None for t in texts):  # streamed pairs: each its own caption
            t_txt, s_txt = self._streamed_texts(batch, list(texts), device)
        else:
            text_rows = self._sample_texts(batch, gen)
            t_txt = self.bank.teacher_emb[text_rows].to(device)
            s_txt = None
            if self.student.has_own_text_tower:
                ids, mask = self.bank.student_ids[text_rows].to(device), self.bank.student_mask[text_rows].to(device)
                s_txt = self.student.encode_tokens(ids, mask)
        out = self.losses(
            student_image=s_img,
            student_text=s_txt,
            student_image_proj=None if self.image_proj is None else self.image_proj(s_img),
            student_text_proj=None if self.text_proj is None or s_txt is None else self.text_proj(s_txt),
            teacher_image=teacher_image.float(),
            teacher_text=t_txt.float(),
            student_class=self._student_class_head(gen, device),
            teacher_class=self.teacher_class_head,
            student_log_scale=self.student.log_logit_scale,
            teacher_scale=teacher_scale,
            student_tower=s_tower,
            teacher_tower=t_tower,
            **self._caption_terms(batch, text_rows is None,
                                  torch.Generator().manual_seed(seed * 1_000_003 + step + 900_007), device),
        )
        if consistency is not None:
            out["qat_consistency_loss"] = consistency
        out["loss"] = total_loss(out)
        return out

    def _caption_terms(self, batch: dict, streamed: bool, generator: torch.Generator,
                       device) -> dict[str, torch.Tensor]:
        """The caption terms' inputs: ``loss.caption_bank_size`` captions of the bank drawn afresh each step (its own
        generator: the texts sampled for the other terms stay the same), as the caption KL's bank and as the
        contrastive term's negatives, after one of each captioned row's own captions."""
        cfg = self.loss_cfg
        if cfg.caption_weight <= 0 and cfg.caption_contrastive_weight <= 0:
            return {}
        drawn = self._draw_captions(generator)
        out = {}
        if cfg.caption_weight > 0:
            out["caption_bank"] = self.bank.teacher_emb[drawn].to(device)
        if cfg.caption_contrastive_weight > 0:
            if streamed:
                raise ValueError("loss.caption_contrastive_weight needs the captions of map-style data (a caption column),"
                                 " not streamed pairs")
            out.update(self._contrastive_captions(batch["index"].tolist(), drawn, generator, device))
        return out

    def _draw_captions(self, generator: torch.Generator) -> torch.Tensor:
        first = self.bank.prompt_rows.numel()  # the bank holds the prompts first, then the sources' captions
        count = len(self.bank.texts) - first
        if count <= 0:
            raise ValueError("loss.caption_weight / caption_contrastive_weight > 0 but the training sources gave no "
                             "captions: name a caption column (data.train[i].caption_column) whose rows hold text")
        take = min(self.loss_cfg.caption_bank_size, count)
        rows = torch.randperm(count, generator=generator)[:take] if take < count else torch.arange(count)
        return first + rows

    def _contrastive_captions(self, indices: list[int], drawn: torch.Tensor, generator: torch.Generator,
                              device) -> dict[str, torch.Tensor]:
        """Candidates: one of each row's own captions, drawn at random (a prompt column, never a target, for a row
        without captions), then the drawn bank. A row's target is its own column; every other column holding one of
        its image's captions (another view of the photo, a draw of it) is masked, so it is not ranked as a negative."""
        own = [self.bank.captions_of(i) for i in indices]
        picks = [mine[int(torch.randint(len(mine), (1,), generator=generator))] if mine else 0 for mine in own]
        width = max(1, max(len(mine) for mine in own))
        padded = torch.full((len(own), width), -1, dtype=torch.long)  # -1 matches no candidate
        for r, mine in enumerate(own):
            padded[r, : len(mine)] = torch.tensor(mine, dtype=torch.long)
        candidates = torch.cat([torch.tensor(picks, dtype=torch.long), drawn])
        targets = torch.tensor([r if mine else -1 for r, mine in enumerate(own)], dtype=torch.long)
        mask = (candidates[None, None, :] == padded[:, :, None]).any(dim=1)  # (B, N): a caption of the row's image
        return {"caption_candidates": self.bank.teacher_emb[candidates].to(device),
                "caption_targets": targets.to(device), "caption_mask": mask.to(device)}

    def _qat_consistency(self, pixels: torch.Tensor, s_img: torch.Tensor) -> torch.Tensor | None:
        """``qat.consistency``: weight x how far the fake-quantised image embeddings are from those of the same pixels
        with activations unrounded (weights on their grids: the fp32 model the int8 file must agree with), as
        1 - cosine (``consistency_on: embedding``) or as KL(unrounded || rounded) between their class distributions
        over the class KL's vocabulary at a fixed logit scale (``classes``: ``qat.consistency_scale``, or the
        student's own). Gradients reach both forwards, so rounding's effect on the embedding (or on the decisions)
        is what shrinks."""
        weight = self.qat_cfg.consistency
        if weight <= 0 or self.qat is None:
            return None
        with self.qat.float_activations():
            s_float = self.student.encode_image(pixels)
        if self.qat_cfg.consistency_on == "classes":
            # fixed: a lower scale would flatten both distributions, not make them agree
            scale = self.qat_cfg.consistency_scale or self.student.log_logit_scale.detach().exp()
            head = self.teacher_class_head.float()
            # the class KL's image side: the embedding mapped into the teacher's space where the widths differ
            side = (lambda z: z) if self.image_proj is None else self.image_proj
            log_q = F.log_softmax(scale * F.normalize(side(s_img).float(), dim=-1) @ head.T, dim=-1)
            log_p = F.log_softmax(scale * F.normalize(side(s_float).float(), dim=-1) @ head.T, dim=-1)
            return weight * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
        cos = F.cosine_similarity(s_img.float(), s_float.float(), dim=-1)
        return weight * (1.0 - cos).mean()
