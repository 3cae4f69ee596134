"""Tiny, randomly-initialised CLIP models for tests and offline demos.

The tokenizer is a real ``CLIPTokenizer`` whose vocabulary is the 256 byte symbols (with and
without the end-of-word marker) and no merges, so any text tokenises, offline, in a few KB.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clipcore.imaging import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def _byte_symbols() -> list[str]:
    from clipcore.compat import bytes_to_unicode

    return list(bytes_to_unicode().values())


def write_byte_tokenizer(directory: str | Path, max_length: int = 32):
    """Write a byte-level CLIP tokenizer to ``directory`` and return it loaded."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {tok: i for i, tok in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    # from_pretrained reads vocab.json + merges.txt in both majors (5.x's constructor takes dicts, 4.x's paths).
    tok = CLIPTokenizer.from_pretrained(str(directory), model_max_length=max_length)
    tok.save_pretrained(directory)
    return tok


def tiny_clip_config(vocab_size: int = 514, image_size: int = 32, patch_size: int = 8, hidden: int = 32,
                     layers: int = 2, projection_dim: int = 16, max_length: int = 32):
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers,
                num_attention_heads=4, max_position_embeddings=max_length,
                bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    vision = dict(hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers, num_attention_heads=4,
                  image_size=image_size, patch_size=patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def write_processor_config(directory: str | Path, image_size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> None:
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=list(mean), image_std=list(std)).save_pretrained(directory)


def make_tiny_clip(directory: str | Path, seed: int = 0, image_size: int = 32, **config_kwargs) -> Path:
    """Save a tiny random ``CLIPModel`` with tokenizer and image processor into ``directory``."""
    from transformers import CLIPModel

    directory = Path(directory)
    tok = write_byte_tokenizer(directory, max_length=config_kwargs.get("max_length", 32))
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(vocab_size=len(tok), image_size=image_size, **config_kwargs))
    model.save_pretrained(directory)
    write_processor_config(directory, image_size)
    return directory


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a test's ``torchrun --master_port``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_wordpiece_tokenizer(directory: str | Path):
    """Write a BERT WordPiece tokenizer over single characters (printable ASCII, with and without
    ``##``) to ``directory`` and return it loaded: a few KB, offline, any text tokenises."""
    from transformers import BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # from_pretrained reads vocab.txt in both majors (5.x's constructor takes a dict, 4.x's a path)
    tok = BertTokenizerFast.from_pretrained(str(directory), do_lower_case=True)
    tok.save_pretrained(directory)
    return tok


def make_tiny_tower_teacher(directory: str | Path, seed: int = 0, embed_dim: int = 16, layers: int = 4) -> Path:
    """Save a tiny random tower teacher (``clipcore.towers``) into ``directory``: EfficientNet-Lite0 at
    32 px, a 4-layer width-32 BERT over :func:`write_wordpiece_tokenizer`, MLP heads. Needs the
    ``efficientnet-lite-pytorch`` package (the ``reference`` extra); no weight wheels."""
    from transformers import BertConfig, BertModel

    from clipcore.towers import TowerDualEncoder, TowerSpec, efficientnet

    directory = Path(directory)
    tok = write_wordpiece_tokenizer(directory / "tokenizer")
    torch.manual_seed(seed)
    spec = TowerSpec(image_variant="lite0", image_size=32, head="mlp", embed_dim=embed_dim, head_hidden=24,
                     text_max_length=24)
    text = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=64))  # with the pooler: the loader expects it
    TowerDualEncoder(spec, efficientnet(spec), text, tok).save_directory(directory)
    return directory
