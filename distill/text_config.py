"""Typed configuration of the text-student job (``python -m distill.text_student``).

A YAML recipe (``configs/text_student.yaml``) plus ``key=value`` overrides, parsed once into
:class:`TextJobConfig` with the same parser as the training config (:mod:`distill.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


from distill.config import CacheConfig
from distill.typed_config import ConfigError, parse_config

SHARED = "../shared/data"


@dataclass
class TextStudentSection:
    arch: str = "minilm-text-L2-r64"  # a registered text student (students.list_students("text"))
    init: str | None = "teacher"  # teacher: inherit layers, token table (SVD) and head; null: random


@dataclass
class CorpusConfig:
    """The texts the student learns on: vocabulary prompts and captions (training splits only)."""

    vocabularies: list[str] = field(default_factory=lambda: [f"{SHARED}/imagenet/classnames.json",
                                                             f"{SHARED}/tiny-imagenet/words.json"])
    all_synonyms: bool = True  # every WordNet synonym ("rocking chair, rocker": both), not only the first
    templates: list[str] = field(default_factory=lambda: ["simple", "openai_cifar", "openai_imagenet"])
    captions: list[str] = field(default_factory=lambda: [f"{SHARED}/scene-photos"])  # datasets with captions
    caption_split: str = "train"
    caption_column: str = "captions"
    val_names: int = 100  # seeded class names whose prompts are all held out: validation on unseen names
    val_captions_split: str | None = "validation"  # the captions' tuning split, for validation only (null: none)
    val_captions: int = 1000  # at most this many validation captions (a seeded subset)
    # "tokenizer": every whole word of the teacher's tokenizer vocabulary is a class name too, so that the student
    # knows basic-level words no vocabulary lists ("truck", "frog"); null: off.
    words: str | None = None
    word_templates: int = 4  # templates per word, a seeded draw from `templates` (all 86 would be ~1.8M texts)
    word_min_length: int = 3  # shorter vocabulary entries are mostly abbreviations and pieces


@dataclass
class BankSource:
    """One dataset whose teacher image embeddings join the affinity bank."""

    path: str = ""
    split: str = "train"
    limit: int | None = None  # a seeded subset of this many rows (embedded in full: its cache is shared)


@dataclass
class BankConfig:
    sources: list[BankSource] = field(default_factory=lambda: [
        BankSource(f"{SHARED}/scene-photos", "train", 2048),
        BankSource(f"{SHARED}/tiny-imagenet", "train", 2048),
    ])


@dataclass
class TextLossSection:
    feature_weight: float = 1.0  # 1 - cosine to the teacher's text embedding
    affinity_weight: float = 1.0  # KL over the image bank at the teacher's logit scale
    temperature: float = 2.0  # of the affinity KL (the general recipe's kl_temperature)


@dataclass
class TextOptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_steps: int = 3000
    batch_size: int = 256
    grad_clip: float = 1.0


@dataclass
class TextJobConfig:
    teacher: str = "outputs/reference-zeroshot/final"  # a tower teacher directory (clipcore.towers)
    student: TextStudentSection = field(default_factory=TextStudentSection)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    loss: TextLossSection = field(default_factory=TextLossSection)
    optim: TextOptimConfig = field(default_factory=TextOptimConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    pair_with: str | None = None  # an image model directory: also write output_dir/pair (distill.pair)
    output_dir: str = "outputs/text-student"
    seed: int = 0  # the general recipe's: the bank's image targets are then its cache entries
    device: str = "cpu"
    log_every: int = 50
    eval_every: int = 500  # 0: validate only at the end

    def validate(self) -> "TextJobConfig":
        bounds = (("optim.max_steps", self.optim.max_steps >= 1), ("optim.batch_size", self.optim.batch_size >= 2),
                  ("optim.lr", self.optim.lr > 0), ("optim.warmup_steps", self.optim.warmup_steps >= 0),
                  ("corpus.val_names", self.corpus.val_names >= 0), ("corpus.val_captions", self.corpus.val_captions >= 0),
                  ("corpus.word_templates", self.corpus.word_templates >= 1),
                  ("corpus.word_min_length", self.corpus.word_min_length >= 1),
                  ("log_every", self.log_every >= 1), ("eval_every", self.eval_every >= 0))
        for key, ok in bounds:
            if not ok:
                raise ConfigError(f"{key}={_get(self, key)!r} is out of range")
        if self.corpus.words not in (None, "tokenizer"):
            raise ConfigError(f"corpus.words={self.corpus.words!r}: expected 'tokenizer' or null")
        if not self.corpus.templates:
            raise ConfigError("corpus.templates is empty; name at least one template set")
        if self.corpus.captions and self.corpus.caption_split == self.corpus.val_captions_split:
            raise ConfigError(f"corpus.caption_split={self.corpus.caption_split!r} is also corpus.val_captions_split: "
                              "the student would be validated on captions it trained on")
        if self.loss.affinity_weight > 0 and not self.bank.sources:
            raise ConfigError("loss.affinity_weight > 0 needs bank.sources (datasets of images for the bank)")
        return self


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def load_text_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TextJobConfig:
    """Read a recipe (optional), apply ``key=value`` overrides, validate.

    Raises:
        ConfigError: a missing file, bad YAML, an unknown key (naming the valid ones) or a bad value.
    """
    return parse_config(TextJobConfig, path, overrides).validate()
