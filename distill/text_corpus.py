"""The texts a text student learns on, and the ones it is validated on.

Training: every class name of the vocabularies (with all their WordNet synonyms) under every
template of several sets, optionally every whole word of the tokenizer under a few of them, plus
the captions of the caption datasets' training split. Validation:
all prompts of a seeded set of class names that training never sees (the open vocabulary is the
point), plus the captions of a tuning split; never a test split.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from clipcore.classnames import load_classname_source, synonyms
from clipcore.data import DataSpec, flatten_captions, load_hf_dataset
from clipcore.templates import get_templates
from distill.text_config import CorpusConfig
from distill.train_data import check_path

log = logging.getLogger("distill.text_student")


@dataclass
class TextCorpus:
    """Training and validation texts; ``val_names`` x ``templates`` are the first validation texts."""

    train: list[str]
    val: list[str]
    val_names: list[str]
    templates: list[str]

    @property
    def val_prompts(self) -> int:
        return len(self.val_names) * len(self.templates)


def vocabulary(sources: list[str], all_synonyms: bool) -> list[str]:
    """Class names of every source in order, duplicates (any case) dropped; a WordNet entry
    ``"rocking chair, rocker"`` gives both names, or only the first without ``all_synonyms``."""
    names, seen = [], set()
    for spec in sources:
        check_path(spec, "corpus.vocabularies")
        data = load_classname_source(spec)
        for value in data.values() if isinstance(data, dict) else data:
            parts = synonyms(value)
            if not parts:
                raise ValueError(f"corpus.vocabularies {spec}: entry {value!r} holds no class name")
            for name in parts if all_synonyms else parts[:1]:
                if name.lower() not in seen:
                    seen.add(name.lower())
                    names.append(name)
    return names


def templates_of(sets: list[str]) -> list[str]:
    """The union of several template sets (named, or ``{}`` templates), in order, without repeats."""
    return list(dict.fromkeys(t for spec in sets for t in get_templates(spec)))


def tokenizer_words(vocab: Iterable[str], min_length: int) -> list[str]:
    """The whole words of a tokenizer vocabulary, lower-cased, sorted: ASCII-alphabetic entries of at
    least ``min_length`` letters. WordPiece continuations (``##ing``) are pieces, not words; a BPE
    entry counts once its word-boundary mark (``</w>``, ``Ġ``, ``▁``) is removed."""
    words = set()
    for entry in vocab:
        if entry.startswith("##"):
            continue
        word = entry.removesuffix("</w>").removeprefix("Ġ").removeprefix("▁")
        if len(word) >= min_length and word.isascii() and word.isalpha():
            words.add(word.lower())
    return sorted(words)


def word_prompts(words: list[str], templates: list[str], per_word: int, seed: int) -> list[str]:
    """``per_word`` seeded templates for each word: every word in a few contexts, not all 86."""
    rng = random.Random(seed)
    k = min(per_word, len(templates))
    return [t.format(w) for w in words for t in rng.sample(templates, k)]


def captions(paths: list[str], split: str, column: str) -> list[str]:
    texts: list[str] = []
    for path in paths:
        check_path(path, "corpus.captions")
        ds = load_hf_dataset(DataSpec(path=path, split=split, caption_column=column))
        texts += flatten_captions(ds, column)[0]
    return texts


def build_corpus(cfg: CorpusConfig, seed: int, words: Sequence[str] = ()) -> TextCorpus:
    """Training and validation texts of ``cfg``; the held-out names are drawn with ``seed``.
    ``words`` (:func:`tokenizer_words`, when ``cfg.words`` asks for them) join training under
    ``cfg.word_templates`` templates each, except the words of held-out names.

    Raises:
        ValueError: no class names, or more held-out names than there are names.
    """
    names = vocabulary(cfg.vocabularies, cfg.all_synonyms)
    if cfg.val_names >= len(names):
        raise ValueError(f"corpus.val_names={cfg.val_names} holds out every one of the {len(names)} class names")
    held = set(random.Random(seed).sample(range(len(names)), cfg.val_names))
    templates = templates_of(cfg.templates)
    train_names = [n for i, n in enumerate(names) if i not in held]
    val_names = [n for i, n in enumerate(names) if i in held]
    train = [t.format(n) for n in train_names for t in templates]
    # no word of a held-out name is learnt on its own either: "sea anemone" held out keeps "sea" and "anemone" out
    held_words = {w for n in val_names for w in re.findall(r"[a-z]+", n.lower())}
    kept_words = [w for w in words if w.lower() not in held_words]
    train += word_prompts(kept_words, templates, cfg.word_templates, seed)
    train += captions(cfg.captions, cfg.caption_split, cfg.caption_column)
    train = list(dict.fromkeys(train))  # a caption equal to a prompt is learnt once
    val = [t.format(n) for n in val_names for t in templates]
    if cfg.val_captions_split and cfg.val_captions:
        extra = list(dict.fromkeys(captions(cfg.captions, cfg.val_captions_split, cfg.caption_column)))
        val += random.Random(seed).sample(extra, cfg.val_captions) if len(extra) > cfg.val_captions else extra
    log.info("text corpus: %d class names (%d held out) x %d templates, %d words x %d, %d training texts in all; "
             "%d validation texts", len(names), len(val_names), len(templates), len(kept_words), cfg.word_templates,
             len(train), len(val))
    return TextCorpus(train, val, val_names, templates)
