"""CLIP-architecture students: a plain transformers ``CLIPModel`` wrapped as a dual encoder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipcore.dual_encoder import HFDualEncoder
from clipcore.imaging import ImageTransform
from students.backbones import from_pretrained_strict
from students.configs import ClipStudentConfig

MAX_CONTEXT = 77  # CLIP's context; tokenizers often report a huge model_max_length


@dataclass(frozen=True)
class TextSpec:
    """What a CLIP text tower must know about its tokenizer."""

    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    bos_token_id: int | None
    max_length: int

    @classmethod
    def from_tokenizer(cls, tokenizer, context_length: int | None = None) -> "TextSpec":
        """Read and check the ids that the text tower's pooling depends on.

        Args:
            tokenizer: a transformers tokenizer.
            context_length: text positions; None takes ``tokenizer.model_max_length`` capped at 77.

        Raises:
            ValueError: the tokenizer cannot drive CLIP's pooling at the end-of-text token.
        """
        # BERT-style tokenizers (e.g. a MiniLM teacher's) end every sequence with [SEP] instead
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        name = type(tokenizer).__name__
        if eos is None:
            raise ValueError(f"{name} has no eos or sep token; the CLIP text tower pools at the end-of-text token "
                             "(set student.tokenizer to a CLIP tokenizer)")
        if eos == 2:
            # transformers treats eos_token_id == 2 as a legacy config and pools at argmax(input_ids)
            raise ValueError(f"{name} has eos_token_id 2, which CLIPTextTransformer reads as 'pool at the largest id'")
        if tokenizer("a photo")["input_ids"][-1] != eos:
            raise ValueError(f"{name} does not end sequences with its eos token {eos}; CLIP pools there")
        pad = tokenizer.pad_token_id
        return cls(
            vocab_size=len(tokenizer),
            eos_token_id=eos,
            pad_token_id=eos if pad is None else pad,
            bos_token_id=tokenizer.bos_token_id,
            max_length=context_length or min(int(tokenizer.model_max_length), MAX_CONTEXT),
        )


def clip_config(cfg: ClipStudentConfig, text: TextSpec, *, embed_dim: int, image_size: int):
    """The ``CLIPConfig`` of ``cfg`` for a tokenizer, embedding size and input size.

    Raises:
        ValueError: ``image_size`` is not a multiple of the patch size.
    """
    from transformers import CLIPConfig

    if image_size % cfg.patch_size:
        raise ValueError(f"{cfg.name}: image size {image_size} is not a multiple of patch size {cfg.patch_size}")
    ids = dict(eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id)
    if text.bos_token_id is not None:
        ids["bos_token_id"] = text.bos_token_id
    text_config = dict(cfg.text.hf_kwargs(), vocab_size=text.vocab_size, max_position_embeddings=text.max_length, **ids)
    vision_config = dict(cfg.vision.hf_kwargs(), image_size=image_size, patch_size=cfg.patch_size)
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=embed_dim)


def build_clip_student(
    cfg: ClipStudentConfig,
    *,
    tokenizer,
    embed_dim: int,
    transform: ImageTransform,
    init: str | Path | None = None,
) -> HFDualEncoder:
    """A ``CLIPModel`` student with its own tokenizer and image transform.

    Args:
        cfg: the architecture.
        tokenizer: the student's tokenizer (sets vocabulary, special ids, context length).
        embed_dim: projection size.
        transform: the student's image transform; its crop side is the model's image size.
        init: hub id or directory of a ``CLIPModel`` checkpoint of this architecture.

    Returns:
        an :class:`HFDualEncoder` (train mode).
    """
    from transformers import CLIPModel

    image_size = transform.output_size[0]
    config = clip_config(cfg, TextSpec.from_tokenizer(tokenizer, cfg.context_length),
                         embed_dim=embed_dim, image_size=image_size)
    model = CLIPModel(config) if init is None else from_pretrained_strict(CLIPModel, init, config, what=cfg.name)
    return HFDualEncoder(model, tokenizer, transform, name=cfg.name).train()
