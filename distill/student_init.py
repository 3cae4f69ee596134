"""Where a distilled student starts, and what rides on it: a saved student to go on from, QAT, a text student.

* ``student.init`` naming a saved student directory (``student.json``) continues from its weights and
  logit scale: a fine-tune, or the quantisation-aware fine-tune of ``configs/general_qat.yaml``.
* ``qat.enabled`` folds the image tower's batch norms and fake-quantises it (:mod:`students.qat`);
  :func:`finish_qat` removes that before the student is saved, leaving fp32 weights on their int8 grids.
* ``student.mean_share`` gives an image-only student the teacher's share along the teacher's mean
  image embedding before it trains (:func:`set_teacher_mean_share`), so every loss sees it.
* ``export.text_student`` pairs the trained image-only student with a text student for the export
  (:func:`with_text_student`), so an open-vocabulary bundle ships a small text encoder.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from clipcore.dual_encoder import DualEncoder
from distill.config import ConfigError, TrainConfig
from distill.mean_share import MEAN_SHARE_IMAGES, teacher_mean, train_sources
from distill.stream_data import is_stream
from students import PairedStudent, build_student, freeze_early_blocks, load_student
from students.checkpoint import STUDENT_FILE, load_text_student
from students.image_only import FrozenTextStudent
from students.qat import QAT_RANGES_FILE, QATHandle, load_ranges, prepare_qat, save_ranges

log = logging.getLogger("distill.student_init")


def is_saved_student(init: str | None) -> bool:
    return bool(init) and (Path(init) / STUDENT_FILE).is_file()


def initial_student(cfg: TrainConfig, teacher: DualEncoder, tokenizer=None) -> DualEncoder:
    """The student to train, in train mode: built from ``student.arch`` or loaded from ``student.init``.

    Raises:
        ConfigError: ``student.init`` is a saved student of another architecture.
    """
    if is_saved_student(cfg.student.init):
        student = load_student(cfg.student.init, teacher=teacher)
        if student.name != cfg.student.arch:
            raise ConfigError(f"student.init={cfg.student.init} is a {student.name!r} student; "
                              f"student.arch={cfg.student.arch!r} must name the same architecture")
        student = student.to(teacher.device).train()
        tower = getattr(student, "image_tower", None)
        if getattr(tower, "qat_ranges", None):  # they measured the saved weights, which this run retrains
            tower.qat_ranges = None             # (a QAT run records its own when it finishes)
    else:
        student = build_student(cfg.student.arch, teacher=teacher, image_size=cfg.student.image_size,
                                init=cfg.student.init, tokenizer=tokenizer, head=cfg.student.head,
                                head_hidden=cfg.student.head_hidden)
        if not student.has_own_text_tower:  # a CLIP student keeps its own (or inherited) temperature
            with torch.no_grad():
                student.log_logit_scale.fill_(cfg.optim.init_logit_scale)
    if cfg.student.freeze_blocks:
        freeze_early_blocks(student, cfg.student.freeze_blocks)
    return student


def set_teacher_mean_share(cfg: TrainConfig, teacher: DualEncoder, student: DualEncoder) -> float | None:
    """``student.mean_share``: give ``student`` the teacher's share along the teacher's mean unit image
    embedding (over :data:`MEAN_SHARE_IMAGES` seeded images of each training source) before it trains, so
    that the losses train its residual directions through it; the share it got (None when off).

    Every process computes the same mean from the same seeded images; it is saved with the student.

    Raises:
        ConfigError: the student is not image-only (its text side is not the teacher's), or the training
            data is streamed (no seeded subset to take).
    """
    if not cfg.student.mean_share:
        return None
    if not isinstance(student, FrozenTextStudent):
        raise ConfigError(f"student.mean_share=true: {student.name} has its own text tower; the teacher's share "
                          "only fits an image-only student, whose text side is the teacher's")
    if is_stream(cfg.data):
        raise ConfigError("student.mean_share=true takes the teacher's mean over seeded images of each data.train "
                          "source, which streamed or sharded data cannot give; use python -m distill.mean_share "
                          "on a map-style copy of some training images after training instead")
    mean = teacher_mean(teacher, train_sources(cfg.data), MEAN_SHARE_IMAGES, cfg.optim.batch_size)
    share = float(mean.norm())
    student.set_mean_share(mean, share)
    log.info("student.mean_share: every image embedding trains with share %.4f along the teacher's mean", share)
    return share


def qat_self_reference(cfg: TrainConfig, student: DualEncoder) -> DualEncoder | None:
    """``qat.target: self``: a frozen fp32 copy of the student as it starts, whose image embeddings (of the
    same pixels) replace the teacher's as targets. Call before :func:`attach_qat` folds the copy's source.

    Raises:
        ConfigError: ``student.init`` is not a saved student (there would be no fp32 self to agree with).
    """
    if not (cfg.qat.enabled and cfg.qat.target == "self"):
        return None
    if not is_saved_student(cfg.student.init):
        raise ConfigError(f"qat.target=self learns a trained student's own outputs: student.init={cfg.student.init!r} "
                          "is not a saved student directory")
    reference = copy.deepcopy(student).eval()
    reference.requires_grad_(False)
    # the int8 model replaces its fp32 self, temperature included: one logit scale for both
    student.log_logit_scale.requires_grad_(False)
    return reference


def attach_qat(cfg: TrainConfig, student: DualEncoder) -> QATHandle | None:
    """``qat.enabled``: fake-quantise the student's image tower in place (students/qat.py).

    Raises:
        ConfigError: the student has no image tower to quantise (CLIP students).
    """
    if not cfg.qat.enabled:
        return None
    tower = getattr(student, "image_tower", None)
    if tower is None:
        raise ConfigError(f"qat.enabled=true: {student.name} has no image_tower (QAT covers image-only students)")
    side = student.image_transform.output_size
    example = torch.randn(2, 3, *side, generator=torch.Generator().manual_seed(cfg.seed)).to(student.device)
    handle = prepare_qat(tower, lambda: tower(example), momentum=cfg.qat.momentum, learned=cfg.qat.ranges == "learned")
    handle.reset_ranges()  # the first training batch sets them: random pixels are not images
    log.info("%s", handle.summary())
    return handle


def qat_checkpoint_writer(handle: QATHandle | None):
    """What a checkpoint writes beside the model for QAT (None without it): the activation ranges, plain
    attributes outside any ``state_dict``, which a resumed run would otherwise set afresh from one batch."""
    if handle is None:
        return None
    return lambda directory: save_ranges(handle.ranges(), directory)


def restore_qat_ranges(handle: QATHandle | None, checkpoint: Path | None) -> None:
    """Put back the ranges a QAT checkpoint saved (:func:`qat_checkpoint_writer`), so a resumed run trains
    and exports with the ranges the interrupted one had reached.

    Raises:
        ConfigError: a QAT run resumes a checkpoint without ranges (written without QAT), naming it.
    """
    if handle is None or checkpoint is None:
        return
    ranges = load_ranges(checkpoint)
    if ranges is None:
        raise ConfigError(f"qat.enabled=true: {checkpoint} holds no {QAT_RANGES_FILE} (not a QAT run's checkpoint, "
                          "or one written before ranges were checkpointed): its int8 ranges cannot be recovered; "
                          "start the QAT fine-tune afresh")
    handle.set_ranges(ranges, source=str(Path(checkpoint) / QAT_RANGES_FILE))
    log.info("QAT: %d activation ranges restored from %s", len(ranges), checkpoint)


def finish_qat(handle: QATHandle | None) -> None:
    """Leave the plain fp32 weights the fine-tune learnt (what is saved and exported), and the activation
    ranges it trained under on the tower (``qat_ranges``: saved with the student, used by the int8 export)."""
    if handle is not None:
        handle.model.qat_ranges = handle.ranges()
        handle.strip()
        log.info("QAT removed: the saved student holds fp32 weights on their int8 grids (batch norms folded)")


def with_text_student(cfg: TrainConfig, student: DualEncoder) -> DualEncoder:
    """The model to export: ``student`` itself, or paired with ``export.text_student``.

    Raises:
        ConfigError: ``export.text_student`` is not a text student directory, or embeds into a space
            of another size than ``student`` (the message names the key, both sizes and the path).
    """
    if not cfg.export.text_student:
        return student
    try:
        text = load_text_student(cfg.export.text_student).to(student.device)
        return PairedStudent(student, text, name=f"{student.name}+{text.name}").eval()
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"export.text_student={cfg.export.text_student}: {exc}") from exc
