"""Prompt template sets for zero-shot classification.

The OpenAI sets are the ones published with CLIP (``openai/CLIP`` notebooks and
``data/prompts.md``) and reused by open_clip and CLIP_benchmark.
"""

from __future__ import annotations

import string
from typing import Sequence

SIMPLE = ("a photo of a {}.",)

OPENAI_CIFAR = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

OPENAI_IMAGENET = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.",
    "art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.",
    "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.",
    "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "simple": SIMPLE,
    "openai_cifar": OPENAI_CIFAR,
    "openai_imagenet": OPENAI_IMAGENET,
}


def get_templates(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A named template set, or a user list of ``{}``-templates, validated."""
    if isinstance(spec, str):
        if spec in TEMPLATE_SETS:
            return TEMPLATE_SETS[spec]
        if "{" not in spec:
            raise ValueError(f"unknown template set {spec!r}; known: {sorted(TEMPLATE_SETS)} or a '{{}}' template")
        check_template(spec)
        return (spec,)
    templates = tuple(spec)
    if not templates:
        raise ValueError("the template list is empty")
    for template in templates:
        check_template(template)
    return templates


def check_template(template: str) -> None:
    """Exactly one plain ``{}`` (or ``{0}``) for the class name; ``{{`` and ``}}`` are literal braces.

    A named field or a second placeholder would otherwise fail in ``str.format`` only after the
    whole image pass (KeyError / IndexError), and a format spec would pad or cut class names.
    """
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(str(template))
                  if name is not None]
    except ValueError as exc:  # an unbalanced brace
        raise ValueError(f"template {template!r}: {exc}; a template needs exactly one '{{}}' for the class name "
                         "(write '{{' and '}}' for literal braces)") from None
    if len(fields) != 1 or fields[0] not in (("", "", None), ("0", "", None)):
        shown = ", ".join("{" + n + ("!" + c if c else "") + (":" + s if s else "") + "}" for n, s, c in fields)
        raise ValueError(f"template {template!r}: needs exactly one '{{}}' placeholder for the class name and no "
                         f"other field (found {len(fields)}: {shown or 'none'}); write '{{{{' and '}}}}' for literal braces")
