"""clipcore.compat: one spelling for the APIs that differ between transformers 4.x and 5.x.

CI runs these in both majors (.venv: 5.x, .venv-compat: 4.45), so each test checks the behaviour
the rest of the code relies on, whichever major is installed.
"""

from __future__ import annotations

import pytest
import torch

from clipcore import compat


def test_bytes_to_unicode_is_the_byte_level_alphabet_in_byte_order():
    table = compat.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"  # printable bytes map to themselves


def test_byte_tokenizer_gives_the_same_ids_in_both_majors(tmp_path):
    from clipcore.testing import write_byte_tokenizer

    tok = write_byte_tokenizer(tmp_path, max_length=8)
    out = tok(["a photo", "hi"], padding=True, truncation=True, max_length=8, return_tensors="pt")
    # 512 = <|startoftext|>, 513 = <|endoftext|> (also padding); a word's last byte is its "</w>" twin (+256)
    assert out["input_ids"].tolist() == [[512, 320, 79, 71, 78, 83, 334, 513], [512, 71, 328, 513, 513, 513, 513, 513]]
    assert out["attention_mask"].tolist() == [[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]]


def test_features_are_tensors_equal_to_the_projected_pooled_output(tiny_clip):
    model = tiny_clip.model
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = tiny_clip.tokenize(["a cat", "a photo of a dog"])
    with torch.no_grad():
        image = compat.image_features(model, px)
        text = compat.text_features(model, tokens["input_ids"], tokens["attention_mask"])
        pooled = model.vision_model(pixel_values=px).pooler_output
        expected = model.visual_projection(pooled)
    assert isinstance(image, torch.Tensor) and image.shape == (2, model.config.projection_dim)
    assert isinstance(text, torch.Tensor) and text.shape == (2, model.config.projection_dim)
    torch.testing.assert_close(image, expected)


def test_feature_tensor_names_the_type_it_cannot_read():
    with pytest.raises(TypeError, match="dict"):
        compat.feature_tensor({"logits": torch.zeros(1)})


def test_dtype_keyword_loads_the_requested_dtype(tiny_clip_dir):
    # dtype= raises TypeError in 4.45 (it reaches the model's constructor); torch_dtype= is deprecated in 5.x
    from transformers import CLIPModel

    with compat.quiet_progress():
        model = CLIPModel.from_pretrained(tiny_clip_dir, **compat.dtype_kwargs(torch.bfloat16))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert compat.dtype_kwargs(None) == {}


def test_quiet_progress_silences_loading_and_restores_the_setting(tiny_clip_dir, capfd):
    from transformers import CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    capfd.readouterr()
    with compat.quiet_progress():
        CLIPModel.from_pretrained(tiny_clip_dir)
        assert not hf_logging.is_progress_bar_enabled()
    assert capfd.readouterr().err == ""
    assert hf_logging.is_progress_bar_enabled()
