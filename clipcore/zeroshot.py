"""Zero-shot classifier heads: class names x prompt templates -> normalised class embeddings."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from clipcore.dual_encoder import DualEncoder
from clipcore.templates import get_templates


def validate_classnames(classnames: Sequence[str]) -> list[str]:
    names = [str(c) for c in classnames]
    if not names:
        raise ValueError("the class-name list is empty: zero-shot classification needs at least one class")
    blank = [i for i, c in enumerate(names) if not c.strip()]
    if blank:
        raise ValueError(f"class names at positions {blank} are empty strings")
    return names


@torch.no_grad()
def build_classifier(
    model: DualEncoder,
    classnames: Sequence[str],
    templates: str | Sequence[str] = "simple",
    batch_size: int = 256,
) -> torch.Tensor:
    """The OpenAI / CLIP_benchmark recipe: for each class, encode every prompt, normalise each
    embedding, average them and renormalise.

    Returns:
        float32 tensor of shape (num_classes, embed_dim) with unit-norm rows.
    """
    names = validate_classnames(classnames)
    temps = get_templates(templates)
    prompts = [t.format(c) for c in names for t in temps]
    chunks = [model.encode_text(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    emb = torch.cat(chunks).float().view(len(names), len(temps), -1)
    return F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)


class ClassifierCache:
    """Caches zero-shot heads per (model fingerprint, class names, templates).

    Kept in memory (LRU) and, when ``directory`` is given, on disk as safetensors so that
    later runs (and the export bundle) reuse them.
    """

    def __init__(self, directory: str | Path | None = None, max_items: int = 8):
        self.directory = Path(directory) if directory else None
        self.max_items = max_items
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(fingerprint: str, classnames: Sequence[str], templates: Sequence[str]) -> str:
        blob = json.dumps([fingerprint, list(classnames), list(templates)], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def get(
        self,
        model: DualEncoder,
        classnames: Sequence[str],
        templates: str | Sequence[str] = "simple",
        batch_size: int = 256,
    ) -> torch.Tensor:
        names, temps = validate_classnames(classnames), get_templates(templates)
        key = self.key(model.fingerprint(), names, temps)
        if key in self._memory:
            self.hits += 1
            self._memory.move_to_end(key)
            return self._memory[key]
        head = self._load(key)
        if head is None:
            self.misses += 1
            head = build_classifier(model, names, temps, batch_size).cpu()
            self._save(key, head)
        else:
            self.hits += 1
        self._memory[key] = head
        while len(self._memory) > self.max_items:
            self._memory.popitem(last=False)
        return head

    def _path(self, key: str) -> Path | None:
        return self.directory / f"zeroshot-{key}.safetensors" if self.directory else None

    def _load(self, key: str) -> torch.Tensor | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        from safetensors.torch import load_file

        return load_file(str(path))["classifier"]

    def _save(self, key: str, head: torch.Tensor) -> None:
        path = self._path(key)
        if path is None:
            return
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(head)}")
        save_file({"classifier": head.contiguous()}, str(tmp))
        tmp.replace(path)  # atomic: a reader never sees a half-written head


def zeroshot_logits(
    model: DualEncoder, image_emb: torch.Tensor, classifier: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Class logits ``logit_scale * image_emb @ classifier.T / T``."""
    return model.logits(image_emb, classifier.to(image_emb.device, image_emb.dtype), temperature)
